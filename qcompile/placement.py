"""Placement by measurement (`placement=measured`): which Convs run on integers, decided by timing the
compiled model against fp32 on this machine, and by its error on the calibration data.

Every quantized Conv is first placed on integers. One whose output reaches the next quantized op only
through float ops (HardSwish, a learnable scale, Sigmoid, ...) then needs DequantizeLinear, the float ops
and QuantizeLinear after it, and on small feature maps those cost more than the integer Conv saves: a
PP-LCNet classifier ran 1.2x fp32 so. Those two roundings per Conv also add up: PaddleOCR's recognizers
came out at 4-7 dB with every Conv on integers, 21-35 dB with such Convs float, still faster than fp32.

Where the compiled model is slower than fp32 at batch 1 or 8, or under `MIN_SQNR_DB` on the first
`SQNR_SAMPLES` calibration samples, it is compiled again: with such Convs left float (`float-islands`, if
there are enough of them), and with every layer in float, its weights stored as INT8 that ONNX Runtime
decodes when it loads the model (`float`: fp32's speed, a quarter of its size where the outputs bear the
weights' rounding, `choose-int8-storage`). All are timed interleaved with fp32. Under `MIN_SQNR_DB`,
where the integer model runs well faster than those of them that are accurate, it is also compiled with
the readers of its costliest activation roundings left float, measured one rounding at a time
(`sensitive-float`, `qcompile.sensitivity`; FunASR's FSMN VAD went from 15 to 25 dB with 10 of its 32
layers so), and all are timed again. Kept is the fastest at `MIN_SQNR_DB` and no slower than fp32, else
the fastest at `MIN_SQNR_DB` slower by no more than two timings of one model differ, else the most
accurate no slower than fp32, else the fastest of the most accurate. An alternative that stores no weight
as integers (`float_weights=float32`) is the fp32 model and not one. Where a more accurate candidate is
slower than fp32 by about the noise, all are timed again. The note says what was measured. An fp32 model
too quick to time is placed by accuracy alone: on integers if they are accurate enough, else the most
accurate candidate.
"""
from __future__ import annotations

import glob
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx_ir as ir

from qcompile import sensitivity
from qcompile.calibration import CalibrationData
from qcompile.calibration.runner import batch_samples
from qcompile.data import InputInfo, model_inputs
from qcompile.decisions import FLOAT_ISLANDS_KEY
from qcompile.io import save_model
from qcompile.layers import WEIGHTED_OPS, layer_precisions
from qcompile.session import TIMING, session
from qcompile.target_check import INTEGER_OPS
from qcompile.targets import Target
from qcompile.verify import interleaved_medians, latency_feeds, worst_sqnr_db

T = TypeVar("T")
# Compiles the model again with another placement and more layers excluded: the model and what came with it.
CompileAs = Callable[[str, tuple[str, ...]], tuple[ir.Model, T]]
SENSITIVE_FLOAT_KEY = "qcompile.sensitive_float"  # meta of a sensitive-float candidate: how many layers left float
# Fewer Convs than this share of the quantized ones with float ops after them (a detection head's last
# Convs, say): not worth timing, since leaving them float saves little.
MIN_ISLAND_SHARE = 0.25
# Two sessions of one model differ by up to ~7% on these shared machines: a model is slower than fp32
# where its ratio passes 1 + TOLERANCE, and float islands are kept where they win by more than that.
TOLERANCE = 0.04
# Where a more accurate candidate measures slower than fp32 by up to this many TOLERANCEs, all are timed
# again and the two timings averaged: one timing of a ~1 ms model can be that far off.
CLOSE = 3
ROUNDS, SECONDS = 5, 1.0  # per batch size
# One model alone against fp32 is timed no further once this many rounds put it clearly faster or slower.
SETTLE_ROUNDS = 3
# An fp32 model quicker than this (ms, the smallest batch) is placed by the op rules: its time is mostly
# noise. At 1 ms the PP-OCRv4 classifier went untimed and shipped 1.42x fp32 with every Conv on integers;
# a second of interleaved runs (hundreds of rounds at that size) times it well enough.
MIN_TIMED_MS = 0.25
# SQNRs are measured on this many calibration samples (the first batches): one image can be far from the
# rest (CRAFT's first: 24 dB, where the 16 make 11 dB).
SQNR_SAMPLES = 8
# Below this SQNR (dB, the worst output on the first calibration samples) the other placements are tried
# for accuracy; of candidates under it, those within MIN_GAIN_DB of the most accurate count as equal.
MIN_SQNR_DB, MIN_GAIN_DB = 20.0, 3.0
# The placements tried beside `integer`, in the order preferred at equal speed (more on integers first);
# `sensitive-float`, where tried, goes after them: it is there for speed, and at equal speed the others,
# which leave more float, are the more accurate (PicoDet: 26.8 dB at 0.98x fp32 beside float's 35.0 dB at
# 0.95x, with more float32 weights).
ALTERNATIVES = ("float-islands", "float")
# `sensitive-float` leaves float the readers of the costliest activation roundings until the others'
# errors, each measured alone on one calibration sample (`qcompile.sensitivity`), sum to this SQNR (dB).
# They understate the whole: at MIN_SQNR_DB + 3, FunASR's FSMN VAD came out at 17.6 dB on its calibration
# data; at MIN_SQNR_DB + 6, at 24.7 dB (0.78x fp32, where float ran 0.96x).
SENSITIVE_SQNR_DB = MIN_SQNR_DB + 6
# ... and is tried (after the others are timed) only where the integer model runs at most this share of
# the fastest accurate candidate's time: else the gain is small and the runs, one per rounding, cost more
# than the rest of placement (PicoDet, integer 0.91x fp32 beside float islands at 1.02x: 210 roundings, 98 s
# to compile rather than 32). FSMN VAD (0.75x beside 0.97x) and CRAFT (0.60x beside 0.99x) kept it.
SENSITIVE_SPEEDUP = 0.8


@dataclass(frozen=True)
class Timing:
    ratios: dict[int, float]  # batch -> compiled / fp32
    fp32_ms: float  # at the smallest batch
    sqnr_db: float  # the worst output, on the first calibration samples

    @property
    def worst(self) -> float:
        return max(self.ratios.values())

    def describe(self) -> str:
        ratios = " / ".join(f"{r:.2f}x" for r in self.ratios.values())
        return f"{ratios} fp32 at batch {' / '.join(str(b) for b in self.ratios)}, {self.sqnr_db:.1f} dB"


def _first_samples(data: CalibrationData, inputs: list[InputInfo]) -> list[dict[str, np.ndarray]]:
    """The first batches of ``data`` that hold `SQNR_SAMPLES` samples (or all of it)."""
    feeds, count = [], 0
    for feed in data.batches(inputs):
        feeds.append(feed)
        count += batch_samples(feed, inputs)
        if count >= SQNR_SAMPLES:
            break
    return feeds


def _outputs(sess, names: list[str], feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Each output over ``feeds``, flattened and concatenated."""
    runs = [sess.run(names, feed) for feed in feeds]
    return [np.concatenate([run[i].ravel() for run in runs]) for i in range(len(names))]


def _clear(times: list[list[float]]) -> bool:
    """Whether one model's runs against fp32's (``times``: fp32's, then the model's) already tell it
    faster or slower by more than timings of one model differ."""
    if len(times[0]) < SETTLE_ROUNDS:
        return False
    ratio = statistics.median(times[1]) / statistics.median(times[0])
    return abs(ratio - 1) > CLOSE * TOLERANCE


class Bench:
    """The fp32 model and candidates on the first calibration samples: their SQNR against fp32, and their
    latency as a ratio to fp32's on the first batch (cut or repeated to batch 1 and 8 where the batch is
    free), runs interleaved. Each model's session is opened once, in ``folder``."""

    def __init__(self, reference: Path, inputs: list[InputInfo], data: CalibrationData, target: Target,
                 folder: Path):
        self.reference = session(reference, config=TIMING)
        self.names = [o.name for o in self.reference.get_outputs()]
        self.samples = _first_samples(data, inputs)
        self.expected = _outputs(self.reference, self.names, self.samples)
        self.feeds, _ = latency_feeds(self.samples[0], inputs)
        self.reference_path, self.target, self.folder = reference, target, folder
        self._opened: list[tuple[ir.Model, object]] = []

    def _session(self, model: ir.Model):
        for opened, sess in self._opened:
            if opened is model:
                return sess
        path = save_model(model, self.folder / f"candidate-{len(self._opened)}.onnx")
        sess = self.target.session(path, config=TIMING)
        self._opened.append((model, sess))
        return sess

    def sqnr(self, model: ir.Model) -> float:
        """``model``'s SQNR (dB, its worst output) against fp32."""
        return worst_sqnr_db(self.expected, _outputs(self._session(model), self.names, self.samples))

    def costliest_roundings(self, model: ir.Model) -> tuple[list[str], int]:
        """The nodes to leave float so that ``model``'s activation roundings cost the outputs no more than
        `SENSITIVE_SQNR_DB` (`qcompile.sensitivity`), and how many roundings that leaves."""
        canonical = sensitivity.canonical_model(self.reference_path)
        names = {v.name for v in canonical.graph.inputs} | {v.name for node in canonical.graph for v in node.outputs}
        roundings = sensitivity.activation_roundings(model, names)
        errors = sensitivity.rounding_errors(canonical, roundings, self.feeds[min(self.feeds)], self.folder)
        readers = sensitivity.readers_to_leave_float(roundings, errors, 10 ** (-SENSITIVE_SQNR_DB / 10))
        return readers, sum(not set(r.readers) <= set(readers) for r in roundings)

    def time(self, models: list[ir.Model], sqnrs: list[float] | None = None) -> list[Timing]:
        """Each model's latency ratios to fp32, and its SQNR (measured unless given). One model alone is
        timed until it is clearly faster or slower than fp32, at most as long as several are."""
        sessions = [self.reference] + [self._session(model) for model in models]
        ratios: list[dict[int, float]] = [{} for _ in models]
        fp32_ms = {}
        for batch, feed in self.feeds.items():
            for s in sessions:  # warm-up
                s.run(self.names, feed)
            (fp32_ms[batch], *compiled), _ = interleaved_medians(sessions, self.names, feed, ROUNDS, SECONDS,
                                                                 settled=_clear if len(models) == 1 else None)
            for i, ms in enumerate(compiled):
                ratios[i][batch] = ms / fp32_ms[batch]
        sqnrs = sqnrs or [self.sqnr(model) for model in models]
        return [Timing(r, fp32_ms[min(fp32_ms)], sqnr) for r, sqnr in zip(ratios, sqnrs)]


def _too_quick(timing: Timing) -> str:
    return f"placement: the fp32 model runs in {timing.fp32_ms:.2f} ms, too quick to time against"


def _mean(first: Timing, second: Timing) -> Timing:
    """Two timings of one model, their ratios averaged per batch."""
    ratios = {batch: (ratio + second.ratios[batch]) / 2 for batch, ratio in first.ratios.items()}
    return Timing(ratios, (first.fp32_ms + second.fp32_ms) / 2, first.sqnr_db)


def _quantized_layers(model: ir.Model, op_types: set[str] = WEIGHTED_OPS) -> int:
    """How many layers of ``op_types`` read a dequantized weight, or compute on integers."""
    def dequantized(value):
        return value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear"

    return sum(node.op_type in op_types and (node.op_type in INTEGER_OPS
                                             or (len(node.inputs) > 1 and dequantized(node.inputs[1])))
               for node in model.graph)


def _stores_integer_weights(model: ir.Model) -> bool:
    """Whether some layer's weight is stored as integers: if none is, the model is the fp32 one."""
    return any(row["precision"].startswith(("w:int", "w:uint")) for row in layer_precisions(model))


def _islands_worth_trying(integer: ir.Model) -> bool:
    """Whether enough Convs have float ops after them (a detection head's last few do not make a difference),
    and some layer stays on integers without them (else float islands are the float placement: CRAFT's 27)."""
    islands = integer.meta.get(FLOAT_ISLANDS_KEY, 0)
    convs = _quantized_layers(integer, {"Conv", "QLinearConv"})
    return 0 < islands < _quantized_layers(integer) and islands >= MIN_ISLAND_SHARE * convs


def _fastest(timings: list[Timing], among: list[int]) -> int:
    """The quickest of ``among``; of those within the noise of it, the first (the one most on integers)."""
    quickest = min(timings[i].worst for i in among)
    return next(i for i in among if timings[i].worst <= quickest + TOLERANCE)


def _decide(timings: list[Timing]) -> tuple[int, str]:
    """Which candidate to keep, and why: the fastest at `MIN_SQNR_DB` no slower than fp32; else the fastest
    at `MIN_SQNR_DB` slower than fp32 by no more than timings of one model differ (`CLOSE`); else the most
    accurate no slower than fp32; else the fastest; the last two of those within `MIN_GAIN_DB` of the most
    accurate."""
    accurate = [i for i, timing in enumerate(timings) if timing.sqnr_db >= MIN_SQNR_DB]
    no_slower = [i for i, timing in enumerate(timings) if timing.worst <= 1 + TOLERANCE]
    if fast_and_accurate := [i for i in accurate if i in no_slower]:
        return _fastest(timings, fast_and_accurate), (f"the fastest at {MIN_SQNR_DB:g} dB or more and no slower "
                                                      f"than fp32")
    if within_noise := [i for i in accurate if timings[i].worst <= 1 + CLOSE * TOLERANCE]:
        return _fastest(timings, within_noise), (f"the fastest at {MIN_SQNR_DB:g} dB or more, slower than fp32 by "
                                                 f"no more than two timings of one model differ")
    if no_slower:
        return _fastest(timings, _near_top(timings, no_slower)), "the most accurate no slower than fp32"
    return _fastest(timings, _near_top(timings, list(range(len(timings))))), "the fastest of the most accurate"


def _near_top(timings: list[Timing], among: list[int]) -> list[int]:
    """Those of ``among`` within `MIN_GAIN_DB` of the most accurate of them."""
    top = max(timings[i].sqnr_db for i in among)
    return [i for i in among if timings[i].sqnr_db > top - MIN_GAIN_DB]


def _close_call(timings: list[Timing], chosen: int) -> bool:
    """Whether the choice hangs on timings within the noise: the chosen candidate, or one more accurate,
    slower than fp32 by up to `CLOSE` tolerances."""
    return any((i == chosen or timing.sqnr_db >= timings[chosen].sqnr_db + MIN_GAIN_DB)
               and 1 + TOLERANCE < timing.worst <= 1 + CLOSE * TOLERANCE for i, timing in enumerate(timings))


def choose_placement(reference: Path, integer: tuple[ir.Model, T], compile_as: CompileAs, data: CalibrationData,
                     target: Target) -> tuple[tuple[ir.Model, T], str]:
    """``integer``, or where that is slower than fp32 or under `MIN_SQNR_DB`, the one `_decide` keeps of it
    and what ``compile_as`` makes with the alternative placements (each a model and what came with it),
    all timed interleaved; and a note of what was measured."""
    with tempfile.TemporaryDirectory(prefix="qcompile-placement-") as folder:
        bench = Bench(reference, model_inputs(integer[0]), data, target, Path(folder))
        return _choose(bench, integer, compile_as)


def _choose(bench: Bench, integer: tuple[ir.Model, T], compile_as: CompileAs) -> tuple[tuple[ir.Model, T], str]:
    if (sqnr := bench.sqnr(integer[0])) >= MIN_SQNR_DB:  # else timed beside the others
        (timing,) = bench.time([integer[0]], [sqnr])
        if timing.fp32_ms < MIN_TIMED_MS:
            return integer, f"{_too_quick(timing)}: every Conv on integers, {timing.sqnr_db:.1f} dB"
        if timing.worst <= 1 + TOLERANCE:
            return integer, f"placement measured on this machine: every Conv on integers {timing.describe()}"
    alternatives = [(name, compile_as(name, ())) for name in ALTERNATIVES
                    if name == "float" or (name == "float-islands" and _islands_worth_trying(integer[0]))]
    candidates = [("integer", integer)] + [(name, c) for name, c in alternatives if _stores_integer_weights(c[0])]
    models = [compiled[0] for _, compiled in candidates]
    timings = bench.time(models)
    if timings[0].fp32_ms < MIN_TIMED_MS:  # the integer model is inaccurate (else timed above): by accuracy
        name, compiled = candidates[max(range(len(timings)), key=lambda i: timings[i].sqnr_db)]
        sqnr = ", ".join(f"{label} {timing.sqnr_db:.1f} dB" for (label, _), timing in zip(candidates, timings))
        return compiled, f"{_too_quick(timings[0])}: {sqnr}: kept {name}, the most accurate"
    if sqnr < MIN_SQNR_DB and _integers_pay(timings) and (sensitive := _sensitive_float(bench, integer, compile_as)):
        candidates.append(("sensitive-float", sensitive))
        models.append(sensitive[0])
        timings = bench.time(models, [timing.sqnr_db for timing in timings] + [bench.sqnr(sensitive[0])])
    chosen, why = _decide(timings)
    if _close_call(timings, chosen):  # timed again, the two timings averaged
        again = bench.time(models, [timing.sqnr_db for timing in timings])
        timings = [_mean(first, second) for first, second in zip(timings, again)]
        chosen, why = _decide(timings)
    measured = "; ".join(f"{_described(name, compiled[0])} {timing.describe()}"
                         for (name, compiled), timing in zip(candidates, timings))
    slower = f"; still {timings[chosen].worst:.2f}x fp32 at worst" if timings[chosen].worst > 1 + TOLERANCE else ""
    name, compiled = candidates[chosen]
    return compiled, f"placement measured on this machine: {measured}: kept {name}, {why}{slower}"


def _integers_pay(timings: list[Timing]) -> bool:
    """Whether the integer model (first) runs fast enough beside the accurate other candidates that a
    placement between them could win (`SENSITIVE_SPEEDUP`)."""
    accurate = [timing.worst for timing in timings[1:] if timing.sqnr_db >= MIN_SQNR_DB]
    return not accurate or timings[0].worst <= SENSITIVE_SPEEDUP * min(accurate)


def _sensitive_float(bench: Bench, integer: tuple[ir.Model, T], compile_as: CompileAs) -> tuple[ir.Model, T] | None:
    """``integer`` compiled again with the readers of its costliest roundings left float; None where that
    leaves none of them float or none rounded (the integer or the float placement)."""
    readers, still_rounded = bench.costliest_roundings(integer[0])
    if not (readers and still_rounded):
        return None
    compiled = compile_as("integer", tuple(glob.escape(r) for r in readers))
    compiled[0].meta[SENSITIVE_FLOAT_KEY] = len(readers)
    return compiled


def _described(name: str, model: ir.Model) -> str:
    if name == "float-islands":
        return f"the {model.meta[FLOAT_ISLANDS_KEY]} Convs with float ops after them left float (float-islands)"
    if name == "sensitive-float":
        return (f"the {model.meta[SENSITIVE_FLOAT_KEY]} layers reading the activations whose rounding costs the "
                f"outputs most left float (sensitive-float)")
    return {"integer": "every Conv on integers (integer)",
            "float": "every layer in float, weights stored INT8 where the outputs bear it (float)"}[name]
