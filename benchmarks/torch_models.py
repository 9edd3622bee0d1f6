"""Models written in torch and exported by torch's two ONNX exporters, for `torch_exports.py`.

Runs under a Python that has torch and onnxscript (the benchmark uses Quark's venv, which has both);
not imported by the project. Usage: python torch_models.py MODEL EXPORTER OUTPUT.onnx [WEIGHTS]

* mobilenetv2: torchvision's MobileNetV2 written out (torchvision is not installed), loading the real
  ImageNet state dict from WEIGHTS (.pth);
* minilm and smollm2: HF transformers' BertModel and LlamaForCausalLM written out (eager attention, no
  KV cache, tied head as x @ embedding.T), loading the real weights from WEIGHTS (.npz with HF names
  and a "config" JSON entry; `torch_exports.py` writes it from the weight packages);
* unet and yolo: random weights with random BatchNorm statistics. They are there for their
  architecture: LeakyRelu / HardSwish / SiLU after convolutions, ConvTranspose, Resize, Concat of skip
  connections, Split, MaxPool pyramids; their accuracy numbers say how close the integer model
  computes the same function, not how well it sees.

EXPORTER: dynamo (torch's default opset), dynamo18, torchscript17, torchscript11.
"""
from __future__ import annotations

import math
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


class BertLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        hidden, self.heads = c["hidden"], c["heads"]
        self.query, self.key, self.value, self.attn_out = (nn.Linear(hidden, hidden) for _ in range(4))
        self.attn_norm, self.ffn_norm = nn.LayerNorm(hidden, c["eps"]), nn.LayerNorm(hidden, c["eps"])
        self.ffn_in, self.ffn_out = nn.Linear(hidden, c["intermediate"]), nn.Linear(c["intermediate"], hidden)

    def heads_first(self, x):
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def forward(self, h, mask):
        q, k, v = (self.heads_first(layer(h)) for layer in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        h = self.attn_norm(self.attn_out(context) + h)
        return self.ffn_norm(self.ffn_out(nn.functional.gelu(self.ffn_in(h))) + h)


class MiniLM(nn.Module):
    """BertModel's encoder: last_hidden_state, with HF's additive (1 - mask) * float-min attention mask."""

    def __init__(self, c: dict):
        super().__init__()
        self.word, self.position, self.token_type = (nn.Embedding(n, c["hidden"]) for n in (c["vocab"],
                                                      c["max_positions"], c["types"]))
        self.norm = nn.LayerNorm(c["hidden"], c["eps"])
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c["layers"]))

    def forward(self, input_ids, attention_mask, token_type_ids):
        positions = torch.arange(input_ids.shape[1])[None]
        h = self.norm(self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions))
        mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.layers:
            h = layer(h, mask)
        return h


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden)), eps

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class LlamaLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        hidden, self.heads, self.kv_heads = c["hidden"], c["heads"], c["kv_heads"]
        dim = hidden // self.heads
        self.q_proj, self.o_proj = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(hidden, self.kv_heads * dim, bias=False) for _ in range(2))
        self.gate_proj, self.up_proj = (nn.Linear(hidden, c["intermediate"], bias=False) for _ in range(2))
        self.down_proj = nn.Linear(c["intermediate"], hidden, bias=False)
        self.input_norm, self.post_norm = RMSNorm(hidden, c["eps"]), RMSNorm(hidden, c["eps"])

    def forward(self, h, cos, sin, mask):
        x = self.input_norm(h)
        q, k, v = (proj(x).view(*x.shape[:2], -1, x.shape[-1] // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        repeat = self.heads // self.kv_heads  # repeat_kv: Unsqueeze -> Expand -> Reshape, as HF writes it
        k, v = (t[:, :, None].expand(-1, -1, repeat, -1, -1).reshape(t.shape[0], -1, *t.shape[2:]) for t in (k, v))
        scores = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5 + mask
        h = h + self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape))
        x = self.post_norm(h)
        return h + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class SmolLM2(nn.Module):
    """LlamaForCausalLM: RoPE computed from positions at run time, causal float-min mask, tied head."""

    def __init__(self, c: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["hidden"], c["eps"])
        dim = c["hidden"] // c["heads"]
        self.register_buffer("inv_freq", 1.0 / c["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim), False)

    def forward(self, input_ids):
        seq = input_ids.shape[1]
        angles = (self.inv_freq[None, :, None] @ torch.arange(seq)[None, None].float()).transpose(1, 2)
        angles = torch.cat((angles, angles), -1)[:, None]
        cos, sin = angles.cos(), angles.sin()
        mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h) @ self.embed_tokens.weight.T


def load_npz(model_type: type[nn.Module], path: str) -> nn.Module:
    import json

    import numpy as np

    with np.load(path) as data:
        model = model_type(json.loads(str(data["config"])))
        model.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files if k != "config"}, strict=True)
    return model


def build(name: str, weights: str | None) -> nn.Module:
    torch.manual_seed(0)
    if name in ("minilm", "smollm2"):
        return load_npz({"minilm": MiniLM, "smollm2": SmolLM2}[name], weights).eval()
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
TEXT_INPUTS = {"minilm": ("input_ids", "attention_mask", "token_type_ids"), "smollm2": ("input_ids",)}


def example(name: str) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...], dict[int, str]]:
    """Example inputs, their names, and the dynamic axes of each (batch; sequence for text)."""
    if name in TEXT_INPUTS:
        names = TEXT_INPUTS[name]
        return tuple(torch.ones(2, 16, dtype=torch.int64) for _ in names), names, {0: "batch", 1: "sequence"}
    size = SIZES[name]
    return (torch.randn(1, 3, size, size),), ("pixel_values",), {0: "batch"}


def export(name: str, exporter: str, output: str, weights: str | None) -> None:
    model = build(name, weights)
    args, names, axes = example(name)
    if exporter.startswith("dynamo"):
        dims = {axis: torch.export.Dim(label, min=1, max=1024) for axis, label in axes.items()}
        torch.onnx.export(model, args, output, dynamo=True, opset_version={"dynamo18": 18}.get(exporter),
                          input_names=list(names), output_names=["output"], dynamic_shapes=tuple(dims for _ in names))
    else:
        torch.onnx.export(model, args, output, dynamo=False, opset_version=int(exporter.removeprefix("torchscript")),
                          input_names=list(names), output_names=["output"],
                          dynamic_axes={n: axes for n in (*names, "output")})


if __name__ == "__main__":
    torch.set_num_threads(2)
    export(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
