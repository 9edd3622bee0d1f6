"""Quantization decisions: what analysis passes attach and lowering passes consume."""
from __future__ import annotations

import json
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile.targets import limit_pairs, pair_sums

# Key under which a `QuantSpec` is stored in `value.meta`.
QUANT_SPEC_KEY = "qcompile.quant_spec"
# Metadata (saved with the model) on a tensor the compiler rescaled per channel: JSON
# {"shape": [...], "factors": [...]} (`channel_scale_json`), so that comparisons with the original
# model can undo it.
CHANNEL_SCALE_KEY = "qcompile.channel_scale"


def channel_scale_json(factors: np.ndarray) -> str:
    """`CHANNEL_SCALE_KEY` metadata for a tensor multiplied by ``factors`` (broadcast as numpy does)."""
    return json.dumps({"shape": list(factors.shape), "factors": [float(f"{f:.7g}") for f in factors.reshape(-1)]})


def read_channel_scale(text: str) -> np.ndarray:
    """The factors of `channel_scale_json`, shaped to broadcast against the tensor."""
    recorded = json.loads(text)
    return np.array(recorded["factors"], np.float64).reshape(recorded["shape"])

_RANGES = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
}

# Activation types ONNX Runtime's integer kernels take; a node with a wider (16-bit) input runs in float.
INTEGER_KERNEL_DTYPES = (ir.DataType.UINT8, ir.DataType.INT8)

_NUMPY_DTYPES = {
    ir.DataType.INT8: np.dtype(np.int8),
    ir.DataType.UINT8: np.dtype(np.uint8),
    ir.DataType.INT16: np.dtype(np.int16),
    ir.DataType.INT32: np.dtype(np.int32),
    ir.DataType.INT4: np.dtype(ml_dtypes.int4),
    ir.DataType.UINT4: np.dtype(ml_dtypes.uint4),
}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: q = clip(round(x / scale) + zero_point, qmin, qmax).

    ``axis`` is None for per-tensor; ``scale`` and ``zero_point`` then are scalars, else 1-D along
    ``axis``. ``qmin``/``qmax`` may be narrower than the dtype (e.g. 7-bit weights for AVX2).
    ``pair_limit``: neighbouring same-signed levels along ``reduction_axes`` add up to at most this
    (`qcompile.targets.limit_pairs`), for integer kernels that add pairs of products in 16 bits.
    """

    dtype: ir.DataType
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    symmetric: bool = True
    method: str = "minmax"
    qmin: int | None = None
    qmax: int | None = None
    pair_limit: int | None = None
    reduction_axes: tuple[int, ...] = ()

    @property
    def bounds(self) -> tuple[int, int]:
        lo, hi = _RANGES[self.dtype]
        return (lo if self.qmin is None else self.qmin, hi if self.qmax is None else self.qmax)

    @property
    def grid_range(self) -> tuple[float, float]:
        """The smallest and largest value a per-tensor grid holds."""
        return grid_range(self.scale, self.zero_point, *self.bounds)

    def _broadcast(self, param: np.ndarray, rank: int) -> np.ndarray:
        if self.axis is None:
            return param
        shape = [1] * rank
        shape[self.axis] = -1
        return param.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.bounds
        scale = self._broadcast(self.scale, x.ndim)
        zero_point = self._broadcast(self.zero_point.astype(np.int64), x.ndim)
        real = x.astype(np.float64) / scale
        q = np.clip(np.rint(real) + zero_point, lo, hi)
        if self.pair_limit is not None:  # symmetric weights: zero point 0
            q = limit_pairs(q, real, self.reduction_axes, self.pair_limit)
        return q.astype(self.numpy_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale = self._broadcast(self.scale, q.ndim)
        zero_point = self._broadcast(self.zero_point.astype(np.int64), q.ndim)
        return ((q.astype(np.int64) - zero_point) * scale).astype(np.float32)

    @property
    def numpy_dtype(self) -> np.dtype:
        return _NUMPY_DTYPES[self.dtype]


def symmetric_weight_spec(weight: np.ndarray, axis: int | None, dtype: ir.DataType, qmax: int,
                          pair_limit: int | None = None, reduction_axes: tuple[int, ...] = ()) -> QuantSpec:
    """Symmetric min/max spec for a weight, per channel along ``axis`` (or per tensor).

    Levels are -qmax..qmax around the zero point: 0 for INT8, 128 for UINT8 (the same grid stored
    unsigned, for u8 x u8 integer kernels). ``pair_limit`` (INT8 only) and ``reduction_axes``: see `QuantSpec`.
    """
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
    step = np.abs(weight).max(axis=reduce_axes) / qmax
    if pair_limit is not None:  # a step coarse enough that no pair of real values exceeds the limit
        step = np.maximum(step, _reduce_to(pair_sums(weight, reduction_axes), axis, reduction_axes, weight.ndim)
                          / pair_limit)
    # An all-zero channel quantizes exactly with any positive scale.
    scale = np.where(step > 0, step, 1.0).astype(np.float32)
    center = 128 if dtype == ir.DataType.UINT8 else 0
    zero_point = np.full(scale.shape, center, dtype=np.uint8 if dtype == ir.DataType.UINT8 else np.int8)
    return QuantSpec(dtype, scale, zero_point, axis=axis, symmetric=True, qmin=center - qmax, qmax=center + qmax,
                     pair_limit=pair_limit, reduction_axes=reduction_axes)


def _reduce_to(per_row: np.ndarray, axis: int | None, reduction_axes: tuple[int, ...], rank: int) -> np.ndarray:
    """Max of ``per_row`` (indexed by the axes not in ``reduction_axes``, in order) down to ``axis`` (or a scalar)."""
    others = [a for a in range(rank) if a not in reduction_axes]
    if axis is None:
        return per_row.max(initial=0.0)
    keep = others.index(axis)
    return per_row.max(axis=tuple(i for i in range(per_row.ndim) if i != keep), initial=0.0)


def grid_range(scale, zero_point, qmin: int, qmax: int) -> tuple[float, float]:
    """The smallest and largest value of the per-tensor grid (scale, zero_point) over [qmin, qmax]."""
    return (qmin - float(zero_point)) * float(scale), (qmax - float(zero_point)) * float(scale)


def grid_within(grid: tuple[float, float], bounds: tuple[float, float]) -> bool:
    """True if every value of ``grid`` (lo, hi) lies inside ``bounds`` (up to float rounding): a Relu or
    Clip with those bounds then changes nothing that the grid's saturation has not done already."""
    return grid[0] >= bounds[0] - 1e-6 * abs(bounds[0]) and grid[1] <= bounds[1] + 1e-6 * abs(bounds[1])


def activation_spec(lo: float, hi: float, dtype: ir.DataType, method: str) -> QuantSpec:
    """Per-tensor spec covering [lo, hi] widened to include 0 (so zero, i.e. padding, is exact).

    INT8 is symmetric (zero point 0, TensorRT's requirement); UINT8 and INT16 are asymmetric.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = _RANGES[dtype]
    if dtype == ir.DataType.INT8:
        amax = max(-lo, hi)
        scale = amax / qmax if amax > 0 else 1.0
        return QuantSpec(dtype, np.array(scale, np.float32), np.array(0, np.int8), symmetric=True, method=method)
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zero_point = np.array(np.clip(qmin + np.rint(-lo / scale), qmin, qmax), _NUMPY_DTYPES[dtype])
    return QuantSpec(dtype, np.array(scale, np.float32), zero_point, symmetric=False, method=method)
