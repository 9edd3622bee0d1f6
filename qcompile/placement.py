"""Placement by measurement (`placement=measured`): which Convs run on integers, decided by timing the
compiled model against fp32 on this machine, and by its error on the calibration data.

Every quantized Conv is first placed on integers. One whose output reaches the next quantized op only
through float ops (HardSwish, a learnable scale, Sigmoid, ...) then needs DequantizeLinear, the float ops
and QuantizeLinear after it, and on small feature maps those cost more than the integer Conv saves: a
PP-LCNet classifier ran 1.2x fp32 so. Those two roundings per Conv also add up: PaddleOCR's recognizers
came out at 4-7 dB with every Conv on integers, 21-35 dB with such Convs float, still faster than fp32.

Where the compiled model is slower than fp32 at batch 1 or 8, or under `MIN_SQNR_DB` on the first batch
of calibration data, the model is compiled again with such Convs left float, weight and all
(`float_islands`), and both are measured again (timed interleaved with fp32). The float islands are kept
where they are faster, or where they are more accurate by `MIN_GAIN_DB`, no slower than fp32, and leave
some weights quantized (timed a second time where they are slower by about the noise). The note says what was measured, or why nothing was: no such Conv, too few of
them, or an fp32 model too quick to time.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import onnx_ir as ir

from qcompile.calibration import CalibrationData
from qcompile.data import model_inputs
from qcompile.decisions import FLOAT_ISLANDS_KEY
from qcompile.io import save_model
from qcompile.session import session
from qcompile.targets import Target
from qcompile.verify import interleaved_medians, latency_feeds, worst_sqnr_db

T = TypeVar("T")
# Fewer Convs than this share of the quantized ones with float ops after them (a detection head's last
# Convs, say): not worth timing, since leaving them float saves little.
MIN_ISLAND_SHARE = 0.25
# Two sessions of one model differ by up to ~7% on these shared machines: a model is slower than fp32
# where its ratio passes 1 + TOLERANCE, and float islands are kept where they win by more than that.
TOLERANCE = 0.04
# Float islands that are more accurate but measure slower than fp32 by up to this many TOLERANCEs are
# timed again, and the two timings averaged: one timing of a ~1 ms model can be that far off.
CLOSE = 3
ROUNDS, SECONDS = 5, 1.0  # per batch size
# An fp32 model quicker than this (ms, the smallest batch) is placed by the op rules: its time is mostly
# noise. At 1 ms the PP-OCRv4 classifier went untimed and shipped 1.42x fp32 with every Conv on integers;
# a second of interleaved runs (hundreds of rounds at that size) times it well enough.
MIN_TIMED_MS = 0.25
# Below this SQNR (dB, the worst output on the first calibration batch) float islands are tried for
# accuracy, and kept where they gain this much more (dB) at no more than fp32's latency.
MIN_SQNR_DB, MIN_GAIN_DB = 20.0, 3.0
# Layers whose weights the compiled model must still quantize for float islands to be kept for accuracy:
# where every one is left float (a chain of Convs ending in a float head), that is the fp32 model.
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class Timing:
    ratios: dict[int, float]  # batch -> compiled / fp32
    fp32_ms: float  # at the smallest batch
    sqnr_db: float  # the worst output, on the first calibration batch

    @property
    def worst(self) -> float:
        return max(self.ratios.values())

    def describe(self) -> str:
        ratios = " / ".join(f"{r:.2f}x" for r in self.ratios.values())
        return f"{ratios} fp32 at batch {' / '.join(str(b) for b in self.ratios)}, {self.sqnr_db:.1f} dB"


def time_against_fp32(reference: Path, models: list[ir.Model], data: CalibrationData, target: Target) -> list[Timing]:
    """Each model's latency as a ratio to ``reference`` on the first batch of ``data`` (cut or repeated
    to batch 1 and 8 where the batch is free), runs interleaved; and its SQNR on that batch."""
    inputs = model_inputs(models[0])
    first = next(iter(data.batches(inputs)))
    feeds, _ = latency_feeds(first, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [save_model(model, Path(tmp) / f"candidate-{i}.onnx") for i, model in enumerate(models)]
        sessions = [session(reference)] + [target.session(path) for path in paths]
        names = [o.name for o in sessions[0].get_outputs()]
        expected, *outputs = [s.run(names, first) for s in sessions]
        ratios: list[dict[int, float]] = [{} for _ in models]
        fp32_ms = {}
        for batch, feed in feeds.items():
            for s in sessions:  # warm-up
                s.run(names, feed)
            (fp32_ms[batch], *compiled), _ = interleaved_medians(sessions, names, feed, ROUNDS, SECONDS)
            for i, ms in enumerate(compiled):
                ratios[i][batch] = ms / fp32_ms[batch]
    return [Timing(r, fp32_ms[min(fp32_ms)], worst_sqnr_db(expected, out)) for r, out in zip(ratios, outputs)]


def sqnr_against_fp32(reference: Path, model: ir.Model, data: CalibrationData, target: Target) -> float:
    """``model``'s SQNR (dB, its worst output) against ``reference`` on the first batch of ``data``."""
    first = next(iter(data.batches(model_inputs(model))))
    with tempfile.TemporaryDirectory() as tmp:
        expected = session(reference).run(None, first)
        return worst_sqnr_db(expected, target.session(save_model(model, Path(tmp) / "candidate.onnx")).run(None, first))


def _too_quick(timing: Timing) -> str:
    return (f"placement by the op rules: the fp32 model runs in {timing.fp32_ms:.2f} ms, too quick to time Convs "
            f"against")


def _mean(first: Timing, second: Timing) -> Timing:
    """Two timings of one model, their ratios averaged per batch."""
    ratios = {batch: (ratio + second.ratios[batch]) / 2 for batch, ratio in first.ratios.items()}
    return Timing(ratios, (first.fp32_ms + second.fp32_ms) / 2, first.sqnr_db)


def _quantized_layers(model: ir.Model, op_types: tuple[str, ...] = ("Conv",)) -> int:
    """How many ``op_types`` nodes read a dequantized weight, or were lowered to QLinear ops."""
    def dequantized(value):
        return value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear"

    return sum((node.op_type in op_types and len(node.inputs) > 1 and dequantized(node.inputs[1]))
               or node.op_type in {f"QLinear{op}" for op in op_types} for node in model.graph)


def choose_placement(reference: Path, integer: tuple[ir.Model, T], compile_islands: Callable[[], tuple[ir.Model, T]],
                     data: CalibrationData, target: Target) -> tuple[tuple[ir.Model, T], str]:
    """``integer``, or where that is slower than fp32 or under `MIN_SQNR_DB` (measured twice: the second
    time interleaved with the other), what ``compile_islands`` makes if that is faster, or more accurate
    and no slower than fp32 (each a model and what came with it); and a note of what was measured."""
    candidates, convs = integer[0].meta.get(FLOAT_ISLANDS_KEY, 0), _quantized_layers(integer[0])
    if not candidates:
        return integer, "placement: no Conv has float ops after it, so every Conv runs on integers (nothing to time)"
    if candidates < MIN_ISLAND_SHARE * convs:
        return integer, (f"placement: {candidates} of {convs} Convs have float ops after them, too few to matter: "
                         f"every Conv on integers (not timed)")
    if sqnr_against_fp32(reference, integer[0], data, target) >= MIN_SQNR_DB:  # else timed beside the islands
        (timing,) = time_against_fp32(reference, [integer[0]], data, target)
        if timing.fp32_ms < MIN_TIMED_MS:
            return integer, _too_quick(timing)
        if timing.worst <= 1 + TOLERANCE:
            return integer, f"placement measured on this machine: every Conv on integers {timing.describe()}"
    islands = compile_islands()
    left_float = islands[0].meta[FLOAT_ISLANDS_KEY]
    timing, islands_timing = time_against_fp32(reference, [integer[0], islands[0]], data, target)
    if timing.fp32_ms < MIN_TIMED_MS:
        return integer, _too_quick(timing)
    more_accurate = (timing.sqnr_db < MIN_SQNR_DB and islands_timing.sqnr_db >= timing.sqnr_db + MIN_GAIN_DB
                     and _quantized_layers(islands[0], WEIGHTED) > 0)
    if more_accurate and 1 + TOLERANCE < islands_timing.worst <= 1 + CLOSE * TOLERANCE:
        # more accurate, and slower than fp32 by no more than two sessions of one model differ: timed again
        again = time_against_fp32(reference, [integer[0], islands[0]], data, target)
        timing, islands_timing = (_mean(first, second) for first, second in zip((timing, islands_timing), again))
    measured = (f"placement measured on this machine: every Conv on integers {timing.describe()}; the {left_float} "
                f"Convs with float ops after them left float (float_islands) {islands_timing.describe()}")
    if more_accurate and islands_timing.worst <= 1 + TOLERANCE:
        chosen, kept, why = islands, islands_timing, "kept float: more accurate, and no slower than fp32"
    elif timing.worst <= 1 + TOLERANCE:
        chosen, kept, why = integer, timing, "kept on integers: no slower than fp32"
    elif islands_timing.worst < timing.worst - TOLERANCE:
        chosen, kept, why = islands, islands_timing, "kept float: faster"
    else:
        chosen, kept, why = integer, timing, "kept on integers: leaving them float was no faster"
    slower = f"; still {kept.worst:.2f}x fp32 at worst" if kept.worst > 1 + TOLERANCE else ""
    return chosen, f"{measured}: {why}{slower}"
