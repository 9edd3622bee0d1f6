"""Models written in torch and exported by torch's two ONNX exporters, for `torch_exports.py`.

Runs under a Python that has torch and onnxscript (the benchmark uses Quark's venv, which has both);
not imported by the project. Usage: python torch_models.py MODEL EXPORTER OUTPUT.onnx [WEIGHTS.pth]

* mobilenetv2: torchvision's MobileNetV2 written out (torchvision is not installed), loading the real
  ImageNet state dict from WEIGHTS.pth;
* unet and yolo: random weights with random BatchNorm statistics. They are there for their
  architecture: LeakyRelu / HardSwish / SiLU after convolutions, ConvTranspose, Resize, Concat of skip
  connections, Split, MaxPool pyramids; their accuracy numbers say how close the integer model
  computes the same function, not how well it sees.

EXPORTER: dynamo (torch's default opset), dynamo18, torchscript17, torchscript11.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def conv_bn(i: int, o: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6):
    layers = [nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, *([act()] if act else []))


class InvertedResidual(nn.Module):
    def __init__(self, i: int, o: int, stride: int, t: int):
        super().__init__()
        hidden = i * t
        layers = [] if t == 1 else [conv_bn(i, hidden, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, o, 1, bias=False), nn.BatchNorm2d(o)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and i == o

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2, with its state-dict names."""

    def __init__(self):
        super().__init__()
        features, c = [conv_bn(3, 32, 3, 2)], 32
        for t, o, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                           (6, 320, 1, 1)]:
            for j in range(n):
                features.append(InvertedResidual(c, o, s if j == 0 else 1, t))
                c = o
        features.append(conv_bn(c, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = conv_bn(3, 16, act=nn.ReLU)
        self.e2 = nn.Sequential(nn.MaxPool2d(2), conv_bn(16, 32, act=nn.ReLU))
        self.e3 = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.LeakyReLU(0.1))
        self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.d2 = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.ReLU())
        self.d1 = nn.Sequential(nn.Conv2d(48, 16, 3, padding=1), nn.Hardswish(), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(a)
        d = self.d2(torch.cat([self.up(self.e3(b)), b], 1))
        d = nn.functional.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.d1(torch.cat([d, a], 1))) * 2 - 1


class C2f(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1 = conv_bn(c, c, 1, act=nn.SiLU)
        self.m = nn.Sequential(conv_bn(c // 2, c // 2, act=nn.SiLU), conv_bn(c // 2, c // 2, act=nn.SiLU))
        self.cv2 = conv_bn(c + c // 2, c, 1, act=nn.SiLU)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2, self.pool = conv_bn(c, c // 2, 1, act=nn.SiLU), conv_bn(c * 2, c, 1, act=nn.SiLU), \
            nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class Yolo(nn.Module):
    """A small YOLOv8-style network: SiLU convolutions, C2f blocks, SPPF, upsample + concat, a split head."""

    def __init__(self):
        super().__init__()
        self.b0 = nn.Sequential(conv_bn(3, 16, 3, 2, act=nn.SiLU), conv_bn(16, 32, 3, 2, act=nn.SiLU), C2f(32))
        self.b1 = nn.Sequential(conv_bn(32, 64, 3, 2, act=nn.SiLU), C2f(64))
        self.b2 = nn.Sequential(conv_bn(64, 128, 3, 2, act=nn.SiLU), C2f(128), SPPF(128))
        self.neck = nn.Sequential(C2f(192), conv_bn(192, 64, 1, act=nn.SiLU))
        self.head = nn.Conv2d(64, 84, 1)

    def forward(self, x):
        p4 = self.b1(self.b0(x))
        y = self.neck(torch.cat([nn.functional.interpolate(self.b2(p4), scale_factor=2.0), p4], 1))
        box, cls = self.head(y).split([4, 80], 1)
        return torch.cat([box, cls.sigmoid()], 1).flatten(2)


def build(name: str, weights: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = {"mobilenetv2": MobileNetV2, "unet": UNet, "yolo": Yolo}[name]()
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False))
    else:
        for module in model.modules():  # trained-looking BatchNorm statistics, so folding them matters
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.3, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


SIZES = {"mobilenetv2": 224, "unet": 64, "yolo": 128}
INPUT, OUTPUT = "pixel_values", "output"


def export(name: str, exporter: str, output: str, weights: str | None) -> None:
    model, size = build(name, weights), SIZES[name]
    x = torch.randn(1, 3, size, size)
    if exporter.startswith("dynamo"):
        opset = {"dynamo18": 18}.get(exporter)
        torch.onnx.export(model, (x,), output, dynamo=True, opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    else:
        torch.onnx.export(model, (x,), output, dynamo=False, opset_version=int(exporter.removeprefix("torchscript")),
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


if __name__ == "__main__":
    torch.set_num_threads(2)
    export(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
