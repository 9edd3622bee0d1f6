"""SmoothQuant, the decision: how much of each MatMul input's outlier channels to move into the weights.

A transformer's linear-layer inputs have a few channels far larger than the rest (MiniLM's GELU
outputs, LLMs' attention inputs); one per-tensor 8-bit grid sized for them leaves the other
channels a handful of levels. For X @ W, dividing input channel j by s_j and multiplying row j of
W by s_j leaves the product unchanged and, with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
(max|X_j| measured on the calibration data), balances the ranges between the activation, quantized
per tensor, and the weight, quantized per output channel (Xiao et al. 2023, "SmoothQuant").

alpha is chosen per activation from `ALPHAS`, or no smoothing, by the output noise that uniform
8-bit grids would add: (step_x^2 / 12) * sum_jn (s_j W_jn)^2 + sum_n (step_wn^2 / 12) * sum_j
E[X_j^2] / s_j^2, from max|X_j| and E[X_j^2] measured on the calibration data. That keeps it off
where channels are balanced (a CNN's classifier input) and strong where outliers dominate (0.8 to
0.9 on MiniLM and SmolLM2, where a fixed 0.5 is worse than none on MiniLM). With per-tensor weights
(per_channel=false) every step_wn is the tensor's largest: the rows that s scales up set it for all
(MiniLM: alpha 0.5 then, mean cosine 0.97; the per-channel estimate chose 0.8-0.9 and gave 0.77).

The decision (`Smoothing`: alpha, s, the MatMuls) is recorded on the activation; `smooth-activations`
applies it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration import CalibrationData, CalibrationRunner, ChannelMax, ChannelMeanSquare
from qcompile.graph import constant_array, name_matches
from qcompile.decisions import SMOOTHING_KEY, Smoothing
from qcompile.notes import add_note

logger = logging.getLogger(__name__)

# Bounds of s: a dead channel (max 0) is left alone, and no channel is scaled absurdly.
MIN_SCALE, MAX_SCALE = 1e-4, 1e4
ALPHAS = (0.5, 0.65, 0.8, 0.9)
_STEPS = 255  # levels of the 8-bit grids the noise estimate assumes



@dataclass(frozen=True)
class ChooseSmoothingOptions:
    data: CalibrationData
    alpha: float | None = None  # None: chosen per activation from ALPHAS (or none) by estimated noise
    exclude: tuple[str, ...] = ()
    per_channel_weights: bool = True  # False: one weight scale per tensor, which scaled-up rows then set
    always: bool = False  # alpha chosen per activation, never no smoothing (`w8a8-smoothquant`)


def _smoothable(node: ir.Node) -> bool:
    """A MatMul by a constant 2-D weight (in, out) that nothing else reads."""
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return (node.op_type == "MatMul" and node.domain == "" and node.inputs[0] is not None and weight is not None
            and weight.ndim == 2 and len(node.inputs[1].uses()) == 1)


def smoothable_groups(model: ir.Model, exclude: tuple[str, ...]) -> dict[ir.Value, list[ir.Node]]:
    """Token activations (rank >= 3) read by MatMuls with constant weights, and those MatMuls.

    Rank 2 (a CNN's pooled features, one vector per sample) is left alone: smoothing evens out the
    per-channel maxima, and from a few hundred calibration vectors those are estimated too poorly
    (MobileNetV2's classifier input then exceeds its smoothed range 4x on other photos); a token
    sequence gives each channel batch x seq observations.
    """
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in model.graph:
        if not _smoothable(node):
            continue
        if name_matches(node.name, exclude):
            continue
        x = node.inputs[0]
        if x.shape is None or x.shape.rank() < 3 or not isinstance(x.shape[-1], int) or x.const_value is not None:
            continue
        if SMOOTHING_KEY in x.meta:  # decided by an earlier run
            continue
        groups.setdefault(x, []).append(node)
    return groups


def _smoothing(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    usable = (x_max > 0) & (w_max > 0)
    scale = np.where(usable, x_max**alpha / np.where(usable, w_max, 1.0) ** (1 - alpha), 1.0)
    return np.clip(scale, MIN_SCALE, MAX_SCALE)


def _noise(scale: np.ndarray, x_max: np.ndarray, x_energy: np.ndarray, magnitudes: list[np.ndarray],
           row_energy: np.ndarray, per_channel: bool) -> float:
    """Estimated output noise of 8-bit X/s (per tensor) times sW (per output channel, or per tensor), from
    |W| as (in, out) and sum_n W_jn^2 over every weight."""
    step_x = 2 * np.max(x_max / scale) / _STEPS
    noise = step_x**2 / 12 * float(np.sum(scale**2 * row_energy))
    weighted_energy = np.sum(x_energy / scale**2)
    for magnitude in magnitudes:
        step_w = 2 * (magnitude * scale[:, None].astype(magnitude.dtype)).max(axis=0).astype(np.float64) / _STEPS
        if not per_channel:
            step_w = np.full_like(step_w, step_w.max())
        noise += np.sum(step_w**2) / 12 * weighted_energy
    return float(noise)


def choose_alpha(x_max: np.ndarray, x_energy: np.ndarray, weights: list[np.ndarray], alpha: float | None,
                 per_channel: bool, always: bool = False):
    """(alpha, s) with the least estimated noise, or None where no smoothing is best (unless ``always``)."""
    magnitudes = [np.abs(w) for w in weights]
    row_energy = sum(np.sum(np.square(w, dtype=np.float64), axis=1) for w in weights)
    w_max = np.max([m.max(axis=1) for m in magnitudes], axis=0).astype(np.float64)

    def noise(scale: np.ndarray) -> float:
        return _noise(scale, x_max, x_energy, magnitudes, row_energy, per_channel)

    scored = [(noise(scale), a, scale)
              for a, scale in ((a, _smoothing(x_max, w_max, a)) for a in ((alpha,) if alpha is not None else ALPHAS))]
    best_noise, best_alpha, best_scale = min(scored, key=lambda c: c[0])
    if alpha is None and not always and best_noise >= noise(np.ones_like(x_max)):
        return None
    return best_alpha, best_scale


class ChooseSmoothingPass(ir.passes.InPlacePass):
    """Measure the channels of MatMul inputs and decide SmoothQuant's alpha and scales for each."""

    name = "choose-smoothing"
    reads_calibration_data = True

    def __init__(self, options: ChooseSmoothingOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = smoothable_groups(model, self.options.exclude)
        if not groups:
            return ir.passes.PassResult(model, modified=False)
        maxima = {x: ChannelMax(-1, absolute=True) for x in groups}
        energies = {x: ChannelMeanSquare(-1) for x in groups}
        CalibrationRunner(model, self.options.data).run({x: [maxima[x], energies[x]] for x in groups},
                                                        "smoothing activations")
        chosen = []
        for x, layers in groups.items():
            x_max, x_energy = maxima[x].value, energies[x].value
            weights = [layer.inputs[1].const_value.numpy() for layer in layers]
            choice = choose_alpha(x_max, x_energy, weights, self.options.alpha, self.options.per_channel_weights,
                             self.options.always)
            logger.debug("%s: channel max/median %.1f, alpha %s", x.name, x_max.max() / max(np.median(x_max), 1e-30),
                         choice and choice[0])
            if choice is None:
                continue
            alpha, scale = choice
            chosen.append(alpha)
            x.meta[SMOOTHING_KEY] = Smoothing(alpha, scale, tuple(layers))
        alphas = ", ".join(f"{a} x{chosen.count(a)}" for a in sorted(set(chosen)))
        add_note(model, f"SmoothQuant: {len(chosen)} of {len(groups)} MatMul inputs smoothed"
                 + (f" (alpha {alphas})" if chosen else ""))
        return ir.passes.PassResult(model, modified=bool(chosen))
