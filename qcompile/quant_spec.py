"""Quantization decisions: what analysis passes attach and lowering passes consume."""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

# Key under which a `QuantSpec` is stored in `value.meta`.
QUANT_SPEC_KEY = "qcompile.quant_spec"
# Metadata (saved with the model) on a tensor the compiler rescaled per channel: JSON
# {"axis": A, "factors": [...]}, so that comparisons with the original model can undo it.
CHANNEL_SCALE_KEY = "qcompile.channel_scale"

_RANGES = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: q = clip(round(x / scale) + zero_point, qmin, qmax).

    ``axis`` is None for per-tensor; ``scale`` and ``zero_point`` then are scalars, else 1-D along
    ``axis``. ``qmin``/``qmax`` may be narrower than the dtype (e.g. 7-bit weights for AVX2).
    """

    dtype: ir.DataType
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    symmetric: bool = True
    method: str = "minmax"
    qmin: int | None = None
    qmax: int | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        lo, hi = _RANGES[self.dtype]
        return (lo if self.qmin is None else self.qmin, hi if self.qmax is None else self.qmax)

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
        q = np.clip(np.rint(x.astype(np.float64) / scale) + zero_point, lo, hi)
        return q.astype(self.numpy_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale = self._broadcast(self.scale, q.ndim)
        zero_point = self._broadcast(self.zero_point.astype(np.int64), q.ndim)
        return ((q.astype(np.int64) - zero_point) * scale).astype(np.float32)

    @property
    def numpy_dtype(self) -> np.dtype:
        return {
            ir.DataType.INT8: np.dtype(np.int8),
            ir.DataType.UINT8: np.dtype(np.uint8),
            ir.DataType.INT16: np.dtype(np.int16),
            ir.DataType.INT32: np.dtype(np.int32),
            ir.DataType.INT4: np.dtype(ml_dtypes.int4),
            ir.DataType.UINT4: np.dtype(ml_dtypes.uint4),
        }[self.dtype]


def symmetric_weight_spec(weight: np.ndarray, axis: int | None, dtype: ir.DataType, qmax: int) -> QuantSpec:
    """Symmetric min/max spec for a weight, per channel along ``axis`` (or per tensor).

    Levels are -qmax..qmax around the zero point: 0 for INT8, 128 for UINT8 (the same grid stored
    unsigned, for u8 x u8 integer kernels).
    """
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
    amax = np.abs(weight).max(axis=reduce_axes).astype(np.float32)
    # An all-zero channel quantizes exactly with any positive scale.
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    center = 128 if dtype == ir.DataType.UINT8 else 0
    zero_point = np.full(scale.shape, center, dtype=np.uint8 if dtype == ir.DataType.UINT8 else np.int8)
    return QuantSpec(dtype, scale, zero_point, axis=axis, symmetric=True, qmin=center - qmax, qmax=center + qmax)


def activation_spec(lo: float, hi: float, dtype: ir.DataType, method: str) -> QuantSpec:
    """Per-tensor spec covering [lo, hi] widened to include 0 (so zero, i.e. padding, is exact).

    INT8 is symmetric (zero point 0, TensorRT's requirement); UINT8 is asymmetric.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == ir.DataType.INT8:
        amax = max(-lo, hi)
        scale = amax / 127 if amax > 0 else 1.0
        return QuantSpec(dtype, np.array(scale, np.float32), np.array(0, np.int8), symmetric=True, method=method)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zero_point = np.array(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)
    return QuantSpec(dtype, np.array(scale, np.float32), zero_point, symmetric=False, method=method)
