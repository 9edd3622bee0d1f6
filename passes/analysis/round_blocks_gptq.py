"""GPTQ: round each block-quantized weight column by column, feeding each column's rounding error forward into
the columns not yet rounded, weighted by the layer's Hessian on calibration data (Frantar et al. 2023).

A linear layer's output error for a weight error dW is ``||X dW||^2``, whose Hessian is H = X^T X over the
calibration rows of its input X. GPTQ rounds the columns of W (one per input feature k) in order; after
rounding column k it moves the other columns by the error times row k of the Cholesky factor of H^-1, so
that the output error the rounding caused is compensated as far as the remaining columns can. Here, as in
the paper's reference code:

* H is damped by ``damp`` x its mean diagonal (and more where it is not yet positive definite); a feature
  never nonzero on the data gets diagonal 1, so its column rounds to nearest;
* the updates are lazy: applied inside a batch of 128 columns at once, to the rest as one matrix product;
* each block's grid (scale and zero point, the same conventions as `assign-block-specs`) is fitted to the
  block's weights as updated when its first column is reached; with ``act_order`` the columns go in order of
  decreasing H diagonal (the most active inputs first), and the grids, fitted before, are the round-to-
  nearest ones (the blocks stay contiguous along K, as MatMulNBits and DequantizeLinear store them).

Calibration goes in ``stages``: the layers are split, in graph order, into that many groups; a group's inputs
are measured on the model whose earlier groups already have their rounded weights (the paper takes every
layer's input from the quantized model, one stage per layer: ``stages`` = the number of distinct layer
inputs). Defaults, chosen on SmolLM2-135M (symmetric blocks of 128) with text that neither the calibration nor
the benchmark uses (Python's docstrings): act order and one stage, perplexity 37.7; four stages 38.4; without
act order 40.3; round to nearest 40.9; fp32 29.0.
Each stage is one run over the data, with one ONNX Runtime session for all of them. Memory: the
Hessians of one stage (K^2 float64 each; a stage is split further where they pass `HESSIAN_BUDGET`), the
levels decided, and, with more than one stage, the rounded weights as float of the stages done.

The decision is the levels themselves: specs from `assign-block-specs` are replaced by ones carrying them
(`QuantSpec.levels`, ``method="gptq"``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from qcompile import progress
from qcompile.calibration import CalibrationData, CalibrationRunner, Gram
from qcompile.decisions import QUANT_SPEC_KEY, PerBlock, QuantSpec
from qcompile.notes import add_note
from qcompile.op_rules import reduction_axis
from qcompile.passes.analysis.assign_block_specs import block_spec

logger = logging.getLogger(__name__)

LAZY_COLUMNS = 128  # columns whose updates are applied together (the reference code's blocksize)
HESSIAN_BUDGET = 1 << 30  # bytes of Hessians one calibration stage may hold


@dataclass(frozen=True)
class GPTQOptions:
    data: CalibrationData
    damp: float = 0.01  # of the mean diagonal of H, added to it
    act_order: bool = True
    stages: int = 1
    negative_scales: bool = True  # the symmetric grids' convention: MatMulNBits' (True) or DequantizeLinear's


@dataclass
class _Weight:
    """A block-quantized weight, the layers that read it and their inputs."""

    value: ir.Value
    spec: QuantSpec
    inputs: list[ir.Value]


def _cholesky_of_inverse(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damping)^-1 = U^T U; the damping grows until H is positive definite."""
    h = hessian.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diagonal = float(np.mean(np.diag(h)))
    for attempt in range(8):
        damped = h + np.eye(len(h)) * damp * mean_diagonal * 10**attempt
        try:
            lower = np.linalg.cholesky(damped)
            inverse = np.linalg.inv(lower)
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the Hessian stays singular under damping")


def gptq_levels(weight: np.ndarray, hessian: np.ndarray, spec: QuantSpec, damp: float = 0.01,
                act_order: bool = False, negative_scales: bool = True) -> QuantSpec:
    """``spec`` (blocks along its axis, round to nearest) with the levels GPTQ chooses for ``weight`` (2-D) given
    the Hessian ``hessian`` (K x K) of the layer's input, and the grids it fitted."""
    granularity = spec.granularity
    assert isinstance(granularity, PerBlock)
    axis, block_size = granularity.axis, granularity.block_size
    w = np.nan_to_num(np.moveaxis(weight.astype(np.float64), axis, -1), nan=0.0)  # (N, K): a row per output
    rows, k = w.shape
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(k)
    u = _cholesky_of_inverse(hessian[np.ix_(order, order)], damp)
    w = w[:, order]
    scales = np.moveaxis(spec.scale.astype(np.float64), axis, -1).copy()  # (N, blocks)
    zero_points = np.moveaxis(spec.zero_point, axis, -1).copy()
    levels = np.zeros((rows, k))
    lazy = max(LAZY_COLUMNS, block_size)  # a multiple of block_size: a block never spans two batches
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        batch, errors = w[:, start:stop].copy(), np.zeros((rows, stop - start))
        for i in range(stop - start):
            column = start + i
            block = order[column] // block_size
            if not act_order and column % block_size == 0:  # fit the block's grid to its updated weights
                fitted = block_spec(batch[:, i:i + block_size], 1, block_size, spec.symmetric, negative_scales,
                                    spec.grid.bits)
                scales[:, block], zero_points[:, block] = fitted.scale[:, 0], fitted.zero_point[:, 0]
            q = spec.grid.encode(batch[:, i] / scales[:, block], zero_points[:, block])
            error = (batch[:, i] - spec.grid.decode(q, zero_points[:, block]) * scales[:, block]) / u[column, column]
            batch[:, i:] -= np.outer(error, u[column, column:stop])
            errors[:, i] = error
            levels[:, column] = q
        w[:, stop:] -= errors @ u[start:stop, stop:]
    restored = np.empty_like(levels)
    restored[:, order] = levels
    return replace(spec, scale=np.moveaxis(scales, -1, axis).astype(np.float32),
                   zero_point=np.moveaxis(zero_points, -1, axis), method="gptq",
                   levels=np.moveaxis(restored, -1, axis).astype(spec.numpy_dtype))


def _block_weights(model: ir.Model) -> list[_Weight]:
    """Weights with a round-to-nearest block spec whose every reader takes a float activation, in graph order of
    their first reader."""
    found: dict[ir.Value, _Weight] = {}
    unmeasurable: set[ir.Value] = set()
    for node in model.graph:
        axis = reduction_axis(node)
        weight = node.inputs[1] if axis is not None else None
        spec = weight.meta.get(QUANT_SPEC_KEY) if weight is not None else None
        if not isinstance(spec, QuantSpec) or not isinstance(spec.granularity, PerBlock) or spec.method != "rtn":
            continue
        x = node.inputs[0]
        if x is None or x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or x.const_value is not None:
            unmeasurable.add(weight)
        found.setdefault(weight, _Weight(weight, spec, [])).inputs.append(x)
    return [w for w in found.values() if w.value not in unmeasurable]


def hessian_stages(features: dict[ir.Value, int], count: int = 1) -> list[list[ir.Value]]:
    """Activations (in graph order, with their feature counts K) in ``count`` consecutive groups, each split
    further where their Hessians (K^2 float64 each) pass `HESSIAN_BUDGET`: one calibration run per group."""
    per_stage = -(-len(features) // max(count, 1))
    stages: list[list[ir.Value]] = []
    held = 0
    for i, (x, k) in enumerate(features.items()):
        if not stages or i % per_stage == 0 or held + k * k * 8 > HESSIAN_BUDGET:
            stages.append([])
            held = 0
        stages[-1].append(x)
        held += k * k * 8
    return stages


def _stages(weights: list[_Weight], count: int) -> list[list[_Weight]]:
    """``weights`` by the stage of their (first) input: `hessian_stages` of the inputs, K from the weights."""
    features = {x: w.value.shape[w.spec.granularity.axis] for w in weights for x in w.inputs}
    stage_of = {x: i for i, stage in enumerate(hessian_stages(features, count)) for x in stage}
    stages = [[w for w in weights if stage_of[w.inputs[0]] == i] for i in range(max(stage_of.values()) + 1)]
    return [stage for stage in stages if stage]


class RoundBlocksGPTQPass(ir.passes.InPlacePass):
    """Choose the levels of every round-to-nearest block spec by GPTQ, on calibration data."""

    name = "round-blocks-gptq"
    reads_calibration_data = True

    def __init__(self, options: GPTQOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        weights = _block_weights(model)
        if not weights:
            return ir.passes.PassResult(model, modified=False)
        stages = _stages(weights, self.options.stages)
        runner = CalibrationRunner(model, self.options.data, replaceable=[w.value for w in weights])
        rounded: dict[ir.Value, np.ndarray] = {}  # the weights done, as the stages after them compute with them
        with progress.task("GPTQ", len(weights)) as advance:
            for number, stage in enumerate(stages, 1):
                grams = {x: Gram() for w in stage for x in w.inputs}
                runner.run({x: [gram] for x, gram in grams.items()}, f"GPTQ stage {number}/{len(stages)}",
                           replacements=rounded)
                for weight in stage:
                    hessian = sum(grams[x].total for x in dict.fromkeys(weight.inputs)) / max(
                        sum(grams[x].rows for x in dict.fromkeys(weight.inputs)), 1)
                    array = weight.value.const_value.numpy()
                    spec = gptq_levels(array, hessian, weight.spec, self.options.damp, self.options.act_order,
                                       self.options.negative_scales)
                    weight.value.meta[QUANT_SPEC_KEY] = spec
                    if number < len(stages):  # a float copy only where a later stage computes with it
                        rounded[weight.value] = spec.dequantize(spec.levels).astype(array.dtype)
                    advance(1)
                del grams
        add_note(model, f"GPTQ: {len(weights)} weight(s) rounded on Hessians from the calibration data, in "
                 f"{len(stages)} stage(s){' in activation order' if self.options.act_order else ''}")
        return ir.passes.PassResult(model, modified=True)
