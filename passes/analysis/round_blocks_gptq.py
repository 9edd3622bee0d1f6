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
from collections import Counter
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
    """Upper Cholesky factor U of (H + damping)^-1 = U^T U; the damping grows until H is positive definite.

    At most three K x K matrices are alive at once (K = 5632: 254 MB each), the input's included."""
    diagonal = np.diag(hessian).copy()
    diagonal[diagonal == 0] = 1.0  # dead inputs
    mean_diagonal = float(np.mean(diagonal))
    for attempt in range(8):
        damped = hessian.copy()
        np.fill_diagonal(damped, diagonal + damp * mean_diagonal * 10**attempt)
        try:
            lower = np.linalg.cholesky(damped)
        except np.linalg.LinAlgError:
            continue
        del damped
        inverse = np.linalg.inv(lower)
        del lower
        return np.linalg.cholesky(inverse.T @ inverse).T
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
    levels = np.zeros((rows, k), np.int16)
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


def hessian_stages(features: dict[ir.Value, int], count: int = 1) -> list[tuple[int, list[ir.Value]]]:
    """Activations (in graph order, with their feature counts K) in ``count`` consecutive groups, each split
    further into runs where their Hessians (K^2 float64 each) pass `HESSIAN_BUDGET`: one calibration run per
    (group number, activations) pair."""
    per_group = -(-len(features) // max(count, 1))
    runs: list[tuple[int, list[ir.Value]]] = []
    held = 0
    for i, (x, k) in enumerate(features.items()):
        if not runs or i % per_group == 0 or held + k * k * 8 > HESSIAN_BUDGET:
            runs.append((i // per_group, []))
            held = 0
        runs[-1][1].append(x)
        held += k * k * 8
    return runs


def _stages(weights: list[_Weight], count: int) -> list[tuple[int, list[_Weight]]]:
    """``weights`` by the run of their (first) input: `hessian_stages` of the inputs, K from the weights."""
    features = {x: w.value.shape[w.spec.granularity.axis] for w in weights for x in w.inputs}
    runs = hessian_stages(features, count)
    run_of = {x: i for i, (_, run) in enumerate(runs) for x in run}
    stages = [(group, [w for w in weights if run_of[w.inputs[0]] == i]) for i, (group, _) in enumerate(runs)]
    return [(group, stage) for group, stage in stages if stage]


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
        last_group = stages[-1][0]
        replaceable = [w.value for w in weights] if last_group else []  # one group: every run on the float model
        runner = CalibrationRunner(model, self.options.data, replaceable=replaceable)
        # The weights of the groups done, as float, which the groups after them compute with.
        rounded: dict[ir.Value, tuple[int, np.ndarray]] = {}
        with progress.task("GPTQ", len(weights)) as advance:
            for number, (group, stage) in enumerate(stages, 1):
                grams = {x: Gram() for w in stage for x in w.inputs}
                runner.run({x: [gram] for x, gram in grams.items()}, f"GPTQ stage {number}/{len(stages)}",
                           replacements={value: array for value, (done, array) in rounded.items() if done < group})
                runner.close()  # each stage observes other values: the next opens its own session
                readers = Counter(x for weight in stage for x in dict.fromkeys(weight.inputs))
                for weight in stage:
                    inputs = list(dict.fromkeys(weight.inputs))
                    rows = max(sum(grams[x].rows for x in inputs), 1)
                    hessian = grams[inputs[0]].total / rows
                    for x in inputs[1:]:  # a weight several layers read: their inputs' rows together
                        hessian += grams[x].total / rows
                    readers.subtract(inputs)
                    for x in inputs:  # a Hessian no other weight of the stage reads is dropped now
                        if not readers[x]:
                            del grams[x]
                    array = weight.value.const_value.numpy()
                    spec = gptq_levels(array, hessian, weight.spec, self.options.damp, self.options.act_order,
                                       self.options.negative_scales)
                    weight.value.meta[QUANT_SPEC_KEY] = spec
                    if group < last_group:  # a float copy only where a later group computes with it
                        rounded[weight.value] = (group, spec.dequantize(spec.levels).astype(array.dtype))
                    advance(1)
        add_note(model, f"GPTQ: {len(weights)} weight(s) rounded on Hessians from the calibration data, in "
                 f"{last_group + 1} stage(s) of {len(stages)} calibration run(s)"
                 f"{' in activation order' if self.options.act_order else ''}")
        return ir.passes.PassResult(model, modified=True)
