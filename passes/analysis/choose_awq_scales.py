"""AWQ, the decision: per-input-channel scales that protect the weights of a layer's most active inputs from
4-bit rounding (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization").

For X @ W, multiplying row j of W by s_j and dividing input channel j by it leaves the product unchanged; the
rows scaled up are rounded on a finer grid, relative to their size, at the cost of the others'. AWQ takes
s_j = a_j^alpha, a_j = mean |x_j| on the calibration data (the paper's; the root mean square, more driven by
outliers, did worse on held-out text: SmolLM2, symmetric blocks of 128, Python's licence 29.3 against 25.6),
normalized so that the largest and smallest s multiply to 1, and searches alpha over 0, 0.05, ..., 0.95
for the least output error of the layers reading X, their weights rounded to the blocks they will get
(`assign-block-specs`' grids). The output error of a weight error E under scales s is
``trace(E^T D H D E)`` with D = diag(1/s) and H = X^T X, so the search needs X's Hessian and channel means, not X: one run
over the data (more where the Hessians pass `hessian_stages`' budget). alpha = 0 is no scaling, so the result is
never worse than round to nearest on the calibration data.

The decision is SmoothQuant's (`Smoothing` on X); `smooth-activations` applies it, folding 1/s into the op
before X where that is exact (an RMSNorm's weight, a LayerNorm, V's projection), else inserting a Mul.
The paper's search of each block's clipping range is not done.

Measured (SmolLM2-135M, symmetric blocks of 128, 2048 calibration tokens of licence texts): better than round
to nearest on Python's docstrings (perplexity 36.2 against 40.9, fp32 29.0) but worse on Python's licence
(25.6 against 23.7, fp32 16.8): the scales chosen on so little data do not carry to every text. Choosing alpha
on one half of the calibration data and judging it on the other did not change that (36.0, 26.3).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration import CalibrationData, CalibrationRunner, ChannelMeanAbs, Gram
from qcompile.decisions import SMOOTHING_KEY, Smoothing
from qcompile.notes import add_note
from qcompile.passes.analysis.assign_block_specs import block_spec, writes_output
from qcompile.passes.analysis.choose_smoothing import MAX_SCALE, MIN_SCALE, smoothable_groups
from qcompile.passes.analysis.round_blocks_gptq import hessian_stages

logger = logging.getLogger(__name__)

ALPHAS = tuple(i / 20 for i in range(20))  # the paper's grid


@dataclass(frozen=True)
class AWQOptions:
    data: CalibrationData
    block_size: int = 32
    symmetric: bool = True
    negative_scales: bool = True  # the symmetric grids' convention: MatMulNBits' (True) or DequantizeLinear's
    head_bits: int = 4
    exclude: tuple[str, ...] = ()


def _rounding_error(weights: list[np.ndarray], bits: list[int], hessian: np.ndarray, scale: np.ndarray,
                    options: AWQOptions) -> float:
    """The layers' output error, summed, with input channels divided by ``scale`` and weight rows multiplied by it."""
    # float32 products: the search compares candidates, and it is most of the pass's time (SmolLM2's head alone
    # is 576 x 576 x 49152 per candidate)
    weighted = (hessian / scale[:, None] / scale[None, :]).astype(np.float32)
    total = 0.0
    for weight, width in zip(weights, bits):
        scaled = weight * scale[:, None]
        spec = block_spec(scaled, 0, options.block_size, options.symmetric, options.negative_scales, width)
        error = (scaled - spec.dequantize(spec.quantize(scaled))).astype(np.float32)
        total += float(np.sum((weighted @ error) * error, dtype=np.float64))
    return total


def awq_scale(magnitude: np.ndarray, alpha: float) -> np.ndarray:
    """s = magnitude^alpha over the active channels, normalized so that the largest and smallest multiply to 1."""
    active = magnitude > 0
    scale = np.where(active, np.power(np.where(active, magnitude, 1.0), alpha), 1.0)
    scale /= np.sqrt(scale[active].max() * scale[active].min())
    return np.clip(scale, MIN_SCALE, MAX_SCALE)


def choose_scale(weights: list[np.ndarray], bits: list[int], hessian: np.ndarray, magnitude: np.ndarray,
                 options: AWQOptions) -> tuple[float, np.ndarray] | None:
    """(alpha, s) of least output error for layers with ``weights`` (K, N_i) on an input whose Hessian is
    ``hessian`` and whose channels' mean magnitudes are ``magnitude``, or None where no scaling (alpha 0) is
    best."""
    active = magnitude > 0
    if not active.any():
        return None
    weights = [w.astype(np.float64) for w in weights]
    best = (_rounding_error(weights, bits, hessian, np.ones(len(hessian)), options), 0.0, None)
    for alpha in ALPHAS[1:]:
        scale = awq_scale(magnitude, alpha)
        error = _rounding_error(weights, bits, hessian, scale, options)
        if error < best[0]:
            best = (error, alpha, scale)
    return None if best[2] is None else (best[1], best[2])


class ChooseAWQScalesPass(ir.passes.InPlacePass):
    """Measure the Hessians of MatMul inputs and decide AWQ's per-channel scales for each."""

    name = "choose-awq-scales"
    reads_calibration_data = True

    def __init__(self, options: AWQOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = smoothable_groups(model, self.options.exclude)
        runner = CalibrationRunner(model, self.options.data)
        chosen = []
        for number, (_, run) in enumerate(hessian_stages({x: x.shape[-1] for x in groups}), 1):
            grams, magnitudes = {x: Gram() for x in run}, {x: ChannelMeanAbs(-1) for x in run}
            runner.run({x: [grams[x], magnitudes[x]] for x in run}, f"AWQ activations {number}")
            runner.close()  # each run observes other values: the next opens its own session
            for x in run:
                layers = groups[x]
                weights = [layer.inputs[1].const_value.numpy() for layer in layers]
                bits = [self.options.head_bits if writes_output(layer.inputs[1]) else 4 for layer in layers]
                hessian = grams[x].total / max(grams[x].rows, 1)
                choice = choose_scale(weights, bits, hessian, magnitudes[x].value, self.options)
                logger.debug("%s: alpha %s", x.name, choice and choice[0])
                if choice is not None:
                    x.meta[SMOOTHING_KEY] = Smoothing(choice[0], choice[1], tuple(layers))
                    chosen.append(choice[0])
            del grams
        add_note(model, f"AWQ: {len(chosen)} of {len(groups)} MatMul inputs scaled"
                 + (f" (alpha {min(chosen):.2f}-{max(chosen):.2f})" if chosen else ""))
        return ir.passes.PassResult(model, modified=bool(chosen))
