"""Quantization decisions: what analysis passes attach and lowering passes consume.

A `QuantSpec` is a grid (`qcompile.decisions.grids`) times a granularity: one scale and zero point
per tensor, per channel along an axis, or per block of ``block_size`` elements along an axis (whose
block scales may themselves be quantized: double quantization). Where several tensors must share one
grid, or a grid follows from others, that is a decision too: `SharedSpec` and `DerivedSpec` (the
PyTorch PT2E quantizer's SharedQuantizationSpec / DerivedQuantizationSpec).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_ir as ir

from qcompile.decisions.grids import FloatGrid, Grid, IntegerGrid
from qcompile.decisions.keys import QUANT_SPEC_KEY

FLOAT8_TYPES = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2)
# Activation types ONNX Runtime's integer kernels take; a node with a wider (16-bit) input runs in float.
INTEGER_KERNEL_DTYPES = (ir.DataType.UINT8, ir.DataType.INT8)
# The largest |bias| in levels of its INT32 grid (step = input step x weight step): half the range, the
# rest left to the sum of the products it is added to.
MAX_BIAS_LEVEL = 2.0**30


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerAxis:
    """One scale and zero point per index of ``axis`` (per output channel, per row)."""

    axis: int


@dataclass(frozen=True)
class PerBlock:
    """One scale and zero point per ``block_size`` consecutive elements along ``axis``; the block scales
    are stored on the grid of ``scale_spec`` where it is given (double quantization, as QLoRA does)."""

    axis: int
    block_size: int
    scale_spec: QuantSpec | None = None


Granularity = PerTensor | PerAxis | PerBlock


class LevelConstraint(Protocol):
    """A target's rule on which combinations of levels its kernels compute exactly (x86's pair sums:
    `qcompile.targets.x86.PairSumLimit`)."""

    def min_step(self, weight: np.ndarray, axis: int | None) -> np.ndarray:
        """The smallest step per index of ``axis`` (or a scalar) at which ``weight`` can comply."""

    def apply(self, q: np.ndarray, real: np.ndarray) -> np.ndarray:
        """``q`` (levels, float) moved where needed so that it complies, staying close to ``real``."""


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: q = grid(x / scale + zero_point), x' = (q - zero_point) * scale.

    ``scale`` and ``zero_point`` are scalars per tensor, 1-D along the axis per channel, and shaped like
    the tensor with the axis divided into blocks per block. ``constraint`` is the target's, for
    kernels that do not compute every level combination exactly. ``levels``, where an analysis chose
    each rounding itself (GPTQ's error feedback), are the tensor's levels: `quantize` returns them.
    """

    grid: Grid
    scale: np.ndarray
    zero_point: np.ndarray
    granularity: Granularity = field(default_factory=PerTensor)
    symmetric: bool = True
    method: str = "minmax"
    constraint: LevelConstraint | None = None
    levels: np.ndarray | None = field(default=None, repr=False)

    @property
    def dtype(self) -> ir.DataType:
        return self.grid.dtype

    @property
    def axis(self) -> int | None:
        return None if isinstance(self.granularity, PerTensor) else self.granularity.axis

    @property
    def block_size(self) -> int | None:
        return self.granularity.block_size if isinstance(self.granularity, PerBlock) else None

    @property
    def bounds(self) -> tuple[float, float]:
        return self.grid.bounds

    @property
    def numpy_dtype(self) -> np.dtype:
        return self.grid.numpy_dtype

    @property
    def grid_range(self) -> tuple[float, float]:
        """The smallest and largest value a per-tensor grid holds."""
        return grid_range(self.scale, self.zero_point, *self.bounds)

    def stored_scale(self) -> np.ndarray:
        """The scale as the model stores it: for double-quantized blocks, after its own quantization."""
        scale_spec = self.granularity.scale_spec if isinstance(self.granularity, PerBlock) else None
        if scale_spec is None:
            return self.scale
        return scale_spec.dequantize(scale_spec.quantize(self.scale))

    def _broadcast(self, param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        granularity = self.granularity
        if isinstance(granularity, PerTensor):
            return param
        if isinstance(granularity, PerAxis):
            target = [1] * len(shape)
            target[granularity.axis] = -1
            return param.reshape(target)
        axis = granularity.axis % len(shape)
        expanded = np.repeat(param, granularity.block_size, axis=axis)
        return np.take(expanded, np.arange(shape[axis]), axis=axis)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        if self.levels is not None:
            if self.levels.shape != x.shape:
                raise ValueError(f"levels of shape {self.levels.shape} decided for a tensor of shape {x.shape}")
            return self.levels.astype(self.numpy_dtype)
        scale = self._broadcast(self.stored_scale(), x.shape)
        zero_point = self._broadcast(self.zero_point, x.shape)
        # NaN stores as zero; a scale that its own 8-bit grid rounded to 0 (double quantization) decodes to 0 anyway
        real = np.nan_to_num(x.astype(np.float64), nan=0.0) / np.where(scale != 0, scale, np.inf)
        q = self.grid.encode(real, zero_point)
        if self.constraint is not None:
            q = self.constraint.apply(q, real)
        return q.astype(self.numpy_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale = self._broadcast(self.stored_scale(), q.shape)
        zero_point = self._broadcast(self.zero_point, q.shape)
        return (self.grid.decode(q, zero_point) * scale).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SharedSpec:
    """The value takes the spec of ``group``'s representative: the inputs and output of an op that
    moves values without computing new ones (Reshape, Concat, MaxPool, ...) share one grid."""

    representative: ir.Value


@dataclass(frozen=True, eq=False)
class DerivedSpec:
    """A spec that follows from the final specs of other values: ``derive(their specs)``."""

    derived_from: tuple[ir.Value, ...]
    derive: Callable[..., QuantSpec]

    def resolve(self) -> QuantSpec | None:
        """The derived spec, or None where one of the values it derives from has no (resolved) spec."""
        specs = [value.meta.get(QUANT_SPEC_KEY) for value in self.derived_from]
        if not all(isinstance(spec, QuantSpec) for spec in specs):
            return None
        return self.derive(*specs)


def symmetric_weight_spec(weight: np.ndarray, axis: int | None, dtype: ir.DataType, qmax: int,
                          constraint: LevelConstraint | None = None, min_step: np.ndarray | float = 0.0) -> QuantSpec:
    """Symmetric min/max spec for a weight, per channel along ``axis`` (or per tensor).

    Levels are -qmax..qmax around the zero point: 0 for INT8, 128 for UINT8 (the same grid stored
    unsigned, for u8 x u8 integer kernels). A ``constraint`` may ask for a coarser step, and so may
    ``min_step`` (per index of ``axis``, or one for the tensor).
    """
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
    step = np.maximum(np.abs(weight).max(axis=reduce_axes) / qmax, min_step)
    if constraint is not None:
        step = np.maximum(step, constraint.min_step(weight, axis))
    # An all-zero channel quantizes exactly with any positive scale.
    scale = np.where(step > 0, step, 1.0).astype(np.float32)
    center = 128 if dtype == ir.DataType.UINT8 else 0
    zero_point = np.full(scale.shape, center, dtype=np.uint8 if dtype == ir.DataType.UINT8 else np.int8)
    return QuantSpec(IntegerGrid(dtype, center - qmax, center + qmax), scale, zero_point,
                     PerTensor() if axis is None else PerAxis(axis), symmetric=True, constraint=constraint)


def float8_weight_spec(weight: np.ndarray, axis: int | None, dtype: ir.DataType) -> QuantSpec:
    """FP8 spec for a weight, per channel along ``axis`` (or per tensor): the largest magnitude maps to the type's
    largest finite value (448 for E4M3FN)."""
    grid = FloatGrid(dtype)
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
    amax = np.abs(weight).max(axis=reduce_axes).astype(np.float64)
    scale = np.where(amax > 0, amax / grid.max, 1.0).astype(np.float32)
    return QuantSpec(grid, scale, np.zeros(scale.shape, grid.numpy_dtype),
                     PerTensor() if axis is None else PerAxis(axis), symmetric=True, method="amax")


def grid_range(scale, zero_point, qmin: float, qmax: float) -> tuple[float, float]:
    """The smallest and largest value of the per-tensor grid (scale, zero_point) over [qmin, qmax]."""
    return (qmin - float(zero_point)) * float(scale), (qmax - float(zero_point)) * float(scale)


def grid_within(grid: tuple[float, float], bounds: tuple[float, float]) -> bool:
    """True if every value of ``grid`` (lo, hi) lies inside ``bounds`` (up to float rounding): a Relu or
    Clip with those bounds then changes nothing that the grid's saturation has not done already."""
    return grid[0] >= bounds[0] - 1e-6 * abs(bounds[0]) and grid[1] <= bounds[1] + 1e-6 * abs(bounds[1])


def activation_spec(lo: float, hi: float, dtype: ir.DataType, method: str) -> QuantSpec:
    """Per-tensor spec covering [lo, hi] widened to include 0 (so zero, i.e. padding, is exact).

    INT8 and FP8 are symmetric (zero point 0, TensorRT's requirement); UINT8 and INT16 are asymmetric.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype in FLOAT8_TYPES:
        grid, amax = FloatGrid(dtype), max(-lo, hi)
        return QuantSpec(grid, np.array(amax / grid.max if amax > 0 else 1.0, np.float32),
                         np.zeros((), grid.numpy_dtype), symmetric=True, method=method)
    grid = IntegerGrid(dtype)
    qmin, qmax = grid.bounds
    if dtype == ir.DataType.INT8:
        amax = max(-lo, hi)
        scale = amax / qmax if amax > 0 else 1.0
        return QuantSpec(grid, np.array(scale, np.float32), np.array(0, np.int8), symmetric=True, method=method)
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zero_point = np.array(np.clip(qmin + np.rint(-lo / scale), qmin, qmax), grid.numpy_dtype)
    return QuantSpec(grid, np.array(scale, np.float32), zero_point, symmetric=False, method=method)

