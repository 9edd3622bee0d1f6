"""The value sets a tensor can be quantized onto: integers of any width, FP8, a code book (NF4).

A grid maps ``real = x / scale (+ zero point)`` to its stored levels and back; scale, zero point and
their layout (per tensor, per channel, per block) belong to the `QuantSpec` that holds the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

_INTEGER_RANGES = {
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
}
_NUMPY_DTYPES = {
    ir.DataType.INT4: np.dtype(ml_dtypes.int4),
    ir.DataType.UINT4: np.dtype(ml_dtypes.uint4),
    ir.DataType.INT8: np.dtype(np.int8),
    ir.DataType.UINT8: np.dtype(np.uint8),
    ir.DataType.INT16: np.dtype(np.int16),
    ir.DataType.UINT16: np.dtype(np.uint16),
    ir.DataType.INT32: np.dtype(np.int32),
    ir.DataType.FLOAT8E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
    ir.DataType.FLOAT8E5M2: np.dtype(ml_dtypes.float8_e5m2),
}


@dataclass(frozen=True)
class IntegerGrid:
    """Integers ``qmin..qmax`` stored as ``dtype``; the bounds may be narrower than the type (7-bit weights)."""

    dtype: ir.DataType
    qmin: int | None = None
    qmax: int | None = None

    def __post_init__(self):
        if self.dtype not in _INTEGER_RANGES:
            raise ValueError(f"no integer grid of type {self.dtype}")

    @property
    def bounds(self) -> tuple[int, int]:
        lo, hi = _INTEGER_RANGES[self.dtype]
        return (lo if self.qmin is None else self.qmin, hi if self.qmax is None else self.qmax)

    @property
    def bits(self) -> int:
        lo, hi = _INTEGER_RANGES[self.dtype]
        return int(hi - lo).bit_length()

    @property
    def signed(self) -> bool:
        return _INTEGER_RANGES[self.dtype][0] < 0

    @property
    def numpy_dtype(self) -> np.dtype:
        return _NUMPY_DTYPES[self.dtype]

    def levels(self, one_sided: bool = False) -> int:
        """Steps a symmetric range [-t, t] gets on one side, or the whole grid on a one-signed tensor
        (the calibration searches weigh clipping against these)."""
        lo, hi = self.bounds
        return hi - lo + 1 if one_sided else (hi - lo + 1) // 2

    def encode(self, real: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """Levels as float64 (before storing): round half to even, shift, saturate. A float zero point
        (HQQ's) shifts before rounding."""
        lo, hi = self.bounds
        if zero_point.dtype.kind == "f":
            return np.clip(np.rint(real + zero_point), lo, hi)
        return np.clip(np.rint(real) + zero_point.astype(np.int64), lo, hi)

    def decode(self, q: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        return q.astype(np.float64) - zero_point.astype(np.float64)


@dataclass(frozen=True)
class FloatGrid:
    """FP8 (E4M3FN or E5M2): x / scale rounded to the nearest representable value, saturated at the
    largest finite one (QuantizeLinear's saturate=1); zero point 0."""

    dtype: ir.DataType

    def __post_init__(self):
        if self.dtype not in (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2):
            raise ValueError(f"no FP8 grid of type {self.dtype}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return _NUMPY_DTYPES[self.dtype]

    @property
    def max(self) -> float:
        return float(ml_dtypes.finfo(self.numpy_dtype).max)

    @property
    def bounds(self) -> tuple[float, float]:
        return -self.max, self.max

    @property
    def bits(self) -> int:
        return 8

    def encode(self, real: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        clipped = np.clip(real, -self.max, self.max)
        return clipped.astype(np.float32).astype(self.numpy_dtype).astype(np.float64)

    def decode(self, q: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        return q.astype(np.float64)


# QLoRA's NormalFloat4 code book (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with 0 exact.
NF4_CODE_BOOK = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0)


@dataclass(frozen=True)
class CodebookGrid:
    """A code book of values (x / scale is stored as the index of the nearest), indexes as ``dtype``."""

    name: str
    values: tuple[float, ...]
    dtype: ir.DataType = ir.DataType.UINT4

    @property
    def numpy_dtype(self) -> np.dtype:
        return _NUMPY_DTYPES[self.dtype]

    @property
    def bounds(self) -> tuple[float, float]:
        return min(self.values), max(self.values)

    @property
    def bits(self) -> int:
        return int(len(self.values) - 1).bit_length()

    def encode(self, real: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        book = np.asarray(self.values, np.float64)
        # The nearest code: compare with the midpoints between sorted neighbours.
        order = np.argsort(book)
        midpoints = (book[order][1:] + book[order][:-1]) / 2
        return order[np.searchsorted(midpoints, real)].astype(np.float64)

    def decode(self, q: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        return np.asarray(self.values, np.float64)[q.astype(np.int64)]


NF4 = CodebookGrid("nf4", NF4_CODE_BOOK)
Grid = IntegerGrid | FloatGrid | CodebookGrid


def numpy_dtype(dtype: ir.DataType) -> np.dtype:
    return _NUMPY_DTYPES[dtype]
