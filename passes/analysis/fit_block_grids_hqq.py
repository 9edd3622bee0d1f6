"""HQQ: fit each asymmetric block's zero point to its weights by half-quadratic optimization, without data.

Half-Quadratic Quantization (Badri & Shaji, 2023) minimizes ``||W - dequantize(quantize(W))||_p`` with
p < 1, which weighs the many small rounding errors less than a few large ones (outliers), by alternating
two easy steps: the error E is shrunk towards zero with the generalized soft-threshold of the l_p norm,
then the zero point z is solved in closed form for the weights minus that error: the mean of
``q - (W - E) / s``, the scale kept from the block's own min/max, as the paper does. z is a float, as
MatMulNBits takes at 4 bits; where the lowering needs integer zero points (block-wise DequantizeLinear, and
MatMulNBits at 8 bits), the start is min/max widened to include 0, and each fitted zero point is rounded.
Symmetric blocks have no zero point to fit: refitting their scale this way instead took SmolLM2-135M from
perplexity 37.4 (round to nearest, blocks of 32) to 40.7, as the l_p fit shrinks the scales and clips the
largest weights.

Each block keeps the iterate with its least mean absolute error (the min/max start included), so the
result is never worse than round to nearest on that start by that measure. Specs from `assign-block-specs`
are refined in place (`method="hqq"`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from qcompile.decisions import QUANT_SPEC_KEY, PerBlock, QuantSpec
from qcompile.passes.analysis.assign_block_specs import blocks_of, from_blocks

# The paper's and ONNX Runtime's settings: l_0.7, beta 10 growing by 1% per step, 20 steps.
LP_NORM, BETA, KAPPA, STEPS = 0.7, 10.0, 1.01, 20


@dataclass(frozen=True)
class HQQOptions:
    integer_zero_points: bool = False  # True where the lowering stores them as integer levels


def _shrink(x: np.ndarray, beta: float) -> np.ndarray:
    """The proximal step of the l_p norm (p < 1), generalized soft-thresholding."""
    return np.sign(x) * np.maximum(np.abs(x) - np.power(np.abs(x) + 1e-8, LP_NORM - 1) / beta, 0)


def _restored(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, levels: tuple[int, int]):
    """Levels and dequantized values of blocks ``w`` (..., block) on grids ``scale``, ``zero`` (...,)."""
    q = np.clip(np.rint(w / scale[..., None] + zero[..., None]), *levels)
    return q, (q - zero[..., None]) * scale[..., None]


def _error(w: np.ndarray, restored: np.ndarray) -> np.ndarray:
    return np.nanmean(np.abs(w - restored), axis=-1)


def fit_zero_points(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, levels: tuple[int, int]) -> np.ndarray:
    """HQQ on blocks ``w`` (..., block) padded with NaN, from ``scale`` and ``zero`` (...,): the fitted zeros."""
    best_zero, best_error = zero.copy(), np.full(scale.shape, np.inf)
    beta = BETA
    for _ in range(STEPS + 1):
        q, restored = _restored(w, scale, zero, levels)
        error = _error(w, restored)
        best_zero = np.where(error < best_error, zero, best_zero)
        best_error = np.minimum(error, best_error)
        target = w - _shrink(w - restored, beta)
        zero = np.nanmean(q - target / scale[..., None], axis=-1)
        beta *= KAPPA
    return best_zero


def _own_range(w: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and (rounded) zero point that span each block's own [min, max] (not widened to 0, as an integer
    zero point needs): the paper's start, and ONNX Runtime's."""
    low, high = np.nanmin(w, axis=-1), np.nanmax(w, axis=-1)
    scale = np.where(high > low, (high - low) / (hi - lo), 1.0)
    return scale, np.rint(lo - low / scale)


def hqq_spec(weight: np.ndarray, spec: QuantSpec, integer_zero_points: bool = False) -> QuantSpec:
    """``spec`` (asymmetric blocks, round to nearest) with its zero points fitted by HQQ to ``weight``."""
    granularity = spec.granularity
    assert isinstance(granularity, PerBlock) and not spec.symmetric
    axis, block_size = granularity.axis, granularity.block_size
    w = blocks_of(weight.astype(np.float64), axis, block_size)
    scale = np.moveaxis(spec.scale.astype(np.float64), axis, -1)
    start = np.moveaxis(spec.zero_point.astype(np.float64), axis, -1)
    if not integer_zero_points:  # a float zero point need not keep 0 on the grid
        scale, start = _own_range(w, *spec.grid.bounds)
    zero = fit_zero_points(w, scale, start, spec.grid.bounds)
    if integer_zero_points:  # rounded, where that does better than min/max's own
        rounded = np.clip(np.rint(zero), *spec.grid.bounds)
        better = (_error(w, _restored(w, scale, rounded, spec.grid.bounds)[1])
                  < _error(w, _restored(w, scale, start, spec.grid.bounds)[1]))
        zero_point = from_blocks(np.where(better, rounded, start), axis).astype(spec.zero_point.dtype)
    else:
        zero_point = from_blocks(zero, axis).astype(np.float32)
    return replace(spec, scale=from_blocks(scale, axis).astype(np.float32), zero_point=zero_point, method="hqq")


class FitBlockGridsHQQPass(ir.passes.InPlacePass):
    """Refit the zero points of every asymmetric block spec by HQQ."""

    name = "fit-block-grids-hqq"

    def __init__(self, options: HQQOptions = HQQOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fitted = 0
        for value in model.graph.initializers.values():
            spec = value.meta.get(QUANT_SPEC_KEY)
            if not isinstance(spec, QuantSpec) or not isinstance(spec.granularity, PerBlock) or spec.method != "rtn" \
                    or spec.symmetric:
                continue
            # MatMulNBits takes float zero points at 4 bits only
            integer = self.options.integer_zero_points or spec.grid.bits != 4
            value.meta[QUANT_SPEC_KEY] = hqq_spec(value.const_value.numpy(), spec, integer)
            fitted += 1
        return ir.passes.PassResult(model, modified=bool(fitted))
