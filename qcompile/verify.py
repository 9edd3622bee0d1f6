"""Numerical comparison of a compiled model against its reference, streamed over the data."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile import progress
from qcompile.data import InputInfo, count_samples, iterate_batches
from qcompile.errors import UsageError
from qcompile.graph import constant_array
from qcompile.report import OutputError
from qcompile.io import load_model, save_model
from qcompile.op_rules import SHARED_OPS
from qcompile.decisions import CHANNEL_SCALE_KEY, read_channel_scale
from qcompile.session import TIMING, run, session
from qcompile.targets import Target


class OutputAccumulator:
    """Running sums for SQNR (signal / error energy), per-sample cosine, max |error|, and how often the
    largest value along the last axis is at the same index (top-1 of a classifier, a CTC step's character)."""

    def __init__(self):
        self.signal = self.noise = 0.0
        self.cosines: list[float] = []
        self.max_abs = 0.0
        self.same_argmax = self.positions = 0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
        err = ref64 - cand64
        self.signal += float(np.sum(ref64 * ref64))
        self.noise += float(np.sum(err * err))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(err))) if err.size else 0.0)
        rows_ref = ref64.reshape(ref64.shape[0], -1) if ref64.ndim > 1 else ref64.reshape(1, -1)
        rows_cand = cand64.reshape(rows_ref.shape)
        norms = np.linalg.norm(rows_ref, axis=1) * np.linalg.norm(rows_cand, axis=1)
        dots = np.sum(rows_ref * rows_cand, axis=1)
        self.cosines.extend(np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 1.0).tolist())
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            self.same_argmax += int(np.count_nonzero(np.argmax(ref64, axis=-1) == np.argmax(cand64, axis=-1)))
            self.positions += ref[..., 0].size

    def result(self, name: str) -> OutputError:
        sqnr = float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
        agreement = self.same_argmax / self.positions if self.positions else None
        return OutputError(name, sqnr, float(np.mean(self.cosines)), self.max_abs, agreement)


def worst_sqnr_db(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """The lowest SQNR (dB) over the outputs of one run of two models."""
    worst = float("inf")
    for ref, cand in zip(reference, candidate):
        accumulator = OutputAccumulator()
        accumulator.add(ref, cand)
        worst = min(worst, accumulator.result("").sqnr_db)
    return worst


class _GridOverflow:
    """How many reference values fall beyond a fixed quantization grid, and the largest as a multiple of
    the grid's end on its side."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.beyond = self.total = 0
        self.peak = 0.0

    def add(self, ref: np.ndarray) -> None:
        self.beyond += int(np.count_nonzero((ref < self.lo) | (ref > self.hi)))
        self.total += ref.size
        if ref.size:
            self.peak = max(self.peak, float(ref.max()) / self.hi if self.hi > 0 else 0.0,
                            float(ref.min()) / self.lo if self.lo < 0 else 0.0)


def compare_models(reference: str | os.PathLike, candidate: str | os.PathLike, data: str,
                   inputs: list[InputInfo], target: Target, limit: int | None = None, seed: int = 0) -> dict:
    """Run both models on ``data``, the candidate as ``target`` would; per-output errors of the candidate,
    and both models' latency where the candidate runs as on its target (not so for targets whose
    Q/DQ semantics are emulated here: that says nothing of their speed)."""
    ref_session, cand_session = session(reference, config=TIMING), target.session(candidate, config=TIMING)
    names = [o.name for o in ref_session.get_outputs()]
    accumulators = {name: OutputAccumulator() for name in names}
    first_feed = None
    for feed in progress.track(iterate_batches(data, inputs, limit, seed), "verifying", total=None):
        _check_finite(feed, data)
        first_feed = feed if first_feed is None else first_feed
        ref_outputs = run(ref_session, names, feed, f"{reference} on {data}")
        cand_outputs = run(cand_session, names, feed, f"{candidate} on {data}")
        for name, ref, cand in zip(names, ref_outputs, cand_outputs):
            accumulators[name].add(ref, cand)
    if first_feed is None:  # never pass a bound on nothing
        raise UsageError(f"{data}: no samples to verify on")
    result = {"samples": count_samples(data, inputs, limit),
              "outputs": [asdict(acc.result(name)) for name, acc in accumulators.items()]}
    if not target.qdq_semantics:  # both sessions ran the first feed above: warmed up
        feeds, result["latency_note"] = latency_feeds(first_feed, inputs)
        result["latency_ms"] = [{"batch": batch, **_latency(ref_session, cand_session, names, feed)}
                                for batch, feed in feeds.items()]
        if result["latency_note"] is None:
            del result["latency_note"]
    return result


LATENCY_BATCHES = (1, 8)


def latency_feeds(feed: dict[str, np.ndarray], inputs: list[InputInfo]) -> tuple[dict[int, dict], str | None]:
    """``feed``'s samples cut or repeated to each of `LATENCY_BATCHES`, where every input has a free batch
    axis; else the feed as it is, and a note why no other batch was timed."""
    fixed = next((i for i in inputs if not i.batched or i.name not in feed or feed[i.name].ndim != len(i.dims)), None)
    if fixed is not None:
        batch = feed[fixed.name].shape[0] if fixed.name in feed and feed[fixed.name].ndim else 1
        why = (f"timed at batch {batch} only: input {fixed.name!r} has no free batch axis "
               f"{fixed.describe()}")
        return {batch: feed}, why
    rows = next(iter(feed.values())).shape[0]
    return {batch: {name: np.concatenate([array] * -(-batch // rows))[:batch] for name, array in feed.items()}
            for batch in LATENCY_BATCHES}, None


def _check_finite(feed: dict[str, np.ndarray], data: str) -> None:
    for name, array in feed.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise UsageError(f"{data}: input {name!r} has NaN or Inf values: no error can be measured on them")


# Latency: at least this many runs of each model, alternating which runs first; more (up to 100) until
# this many seconds have passed.
LATENCY_ROUNDS, LATENCY_SECONDS = 7, 0.5


def _latency(ref_session, cand_session, names: list[str], feed: dict[str, np.ndarray]) -> dict:
    """Median ms of each model on one feed, the runs interleaved so that neither gains from going first."""
    (ref_ms, cand_ms), runs = interleaved_medians([ref_session, cand_session], names, feed)
    return {"reference": ref_ms, "candidate": cand_ms, "ratio": cand_ms / ref_ms, "runs": runs}


def interleaved_medians(sessions: list, names: list[str], feed: dict[str, np.ndarray], min_rounds: int = LATENCY_ROUNDS,
                        seconds: float = LATENCY_SECONDS,
                        settled: Callable[[list[list[float]]], bool] | None = None) -> tuple[list[float], int]:
    """Median ms of each session on ``feed``, and the rounds run: each round runs every session once, in an
    order that rotates, so that none gains from going first; more rounds (up to 100) until ``seconds``,
    fewer where ``settled`` says, from each session's times so far, that more would not change the answer."""
    times: list[list[float]] = [[] for _ in sessions]
    until = time.perf_counter() + seconds
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() < until and rounds < 100):
        if settled is not None and settled(times):
            break
        for i in range(len(sessions)):
            which = (i + rounds) % len(sessions)
            start = time.perf_counter()
            sessions[which].run(names, feed)
            times[which].append(time.perf_counter() - start)
        rounds += 1
    return [1e3 * statistics.median(t) for t in times], rounds


def _quantized_tensors(candidate: ir.Model, reference: ir.Model) -> list[str]:
    """Float tensors the candidate quantizes (a QuantizeLinear reads them) that the reference also has."""
    produced = {v.name for node in reference.graph for v in node.outputs}
    names = []
    for node in candidate.graph:
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"):
            source = node.inputs[0]
            if source is not None and source.name in produced and source.name not in names:
                names.append(source.name)
    return names


def _channel_scales(candidate: ir.Model, names: list[str]) -> dict[str, np.ndarray]:
    """Factors by which the compiler rescaled tensors per channel (`CHANNEL_SCALE_KEY`)."""
    values = {v.name: v for node in candidate.graph for v in node.outputs if v.name in names}
    return {name: read_channel_scale(value.metadata_props[CHANNEL_SCALE_KEY]) for name, value in values.items()
            if CHANNEL_SCALE_KEY in value.metadata_props}


def _grids(candidate: ir.Model, names: list[str]) -> dict[str, _GridOverflow]:
    """The fixed grid of each named tensor quantized by one constant scale (not at run time), half a
    step wider either side: the values beyond it are clipped, not rounded."""
    grids = {}
    for node in candidate.graph:
        source = node.inputs[0] if node.op_type == "QuantizeLinear" and node.inputs else None
        if source is None or source.name not in names:
            continue
        scale = constant_array(node.inputs[1])
        zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 else np.zeros((), np.uint8)
        if scale is None or scale.size != 1 or zero is None or zero.dtype.kind not in "iu":
            continue
        step, low, high = float(scale.reshape(())), np.iinfo(zero.dtype).min, np.iinfo(zero.dtype).max
        offset = float(zero.reshape(()))
        grids[source.name] = _GridOverflow((low - offset - 0.5) * step, (high - offset + 0.5) * step)
    return grids


def _with_outputs(path: str | os.PathLike, names: list[str], folder: str) -> str:
    """A copy of the model in ``folder`` whose named node outputs are also graph outputs."""
    model = load_model(path)
    by_name = {v.name: v for node in model.graph for v in node.outputs}
    outputs = set(model.graph.outputs)
    model.graph.outputs.extend(by_name[n] for n in names if by_name[n] not in outputs)
    return str(save_model(model, Path(folder) / Path(path).name))


def layer_errors(reference: str | os.PathLike, candidate: str | os.PathLike, data: str, inputs: list[InputInfo],
                 target: Target, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Error of the candidate at each tensor it quantizes, worst first.

    ``sqnr_drop_db`` is how much SQNR the layer producing the tensor loses relative to its worst
    measured input, and ``added_noise`` the noise-to-signal ratio it adds (10^(-SQNR/10) out minus in):
    the layer that adds the error, not just one that inherits it. ``beyond_grid`` is the fraction of
    the reference's values that the tensor's calibrated grid clips, and ``peak_over_grid`` the largest
    value over the grid's end on its side (above 1: data the calibration did not cover); both None for
    tensors quantized at run time.
    """
    reference_model, candidate_model = load_model(reference), load_model(candidate)
    names = _quantized_tensors(candidate_model, reference_model)
    if not names:
        return []
    rescaled, grids = _channel_scales(candidate_model, names), _grids(candidate_model, names)
    values = {v.name: v for v in candidate_model.graph.inputs}
    values.update((v.name, v) for node in candidate_model.graph for v in node.outputs)
    readers = {name: quantized_readers(values.get(name)) for name in names}
    del candidate_model
    accumulators = {name: OutputAccumulator() for name in names}
    with tempfile.TemporaryDirectory(prefix="qcompile-eval-") as tmp:
        (Path(tmp) / "reference").mkdir()
        (Path(tmp) / "candidate").mkdir()
        ref_session = session(_with_outputs(reference, names, f"{tmp}/reference"))
        cand_session = target.session(_with_outputs(candidate, names, f"{tmp}/candidate"))
        for feed in progress.track(iterate_batches(data, inputs, limit, seed), "per-layer error"):
            refs = run(ref_session, names, feed, f"{reference} on {data}")
            cands = run(cand_session, names, feed, f"{candidate} on {data}")
            for name, ref, cand in zip(names, refs, cands):
                if name in grids:  # in the candidate's units
                    grids[name].add(ref * rescaled[name] if name in rescaled else ref)
                if name in rescaled:  # back to the reference's units
                    cand = cand / rescaled[name]
                accumulators[name].add(ref, cand)
            del refs, cands, ref, cand  # not alive while the next batch runs
    sqnr = {name: acc.result(name).sqnr_db for name, acc in accumulators.items()}
    producers = {v.name: node for node in reference_model.graph for v in node.outputs}
    rows = []
    for name, acc in accumulators.items():
        error = asdict(acc.result(name))
        node = producers[name]
        upstream = _measured_upstream(node, sqnr)
        worst_input = min([EXACT_DB, *(sqnr[n] for n in upstream)])
        out_db = min(error["sqnr_db"], EXACT_DB)
        grid = grids.get(name)
        error.update(layer=node.name, op_type=node.op_type, readers=readers[name], sqnr_drop_db=worst_input - out_db,
                     added_noise=10 ** (-out_db / 10) - 10 ** (-worst_input / 10),
                     beyond_grid=grid.beyond / max(grid.total, 1) if grid else None,
                     peak_over_grid=grid.peak if grid else None)
        rows.append(error)
    return sorted(rows, key=lambda r: r["sqnr_db"])


EXACT_DB = 100.0  # the SQNR credited to unquantized inputs (graph inputs)
QUANTIZE_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
SELF_QUANTIZING_OPS = ("DynamicQuantizeMatMul",)  # reads a float tensor and quantizes it itself


def quantized_readers(value: ir.Value | None) -> list[str]:
    """The nodes that read ``value`` quantized, through its quantize / dequantize nodes and the ops that
    pass it on in the same grid (Reshape, Transpose, ...): where its quantization is decided (`--exclude`
    or [[nodes]] settings), unlike at its producer, at a Reshape between, or at a reader of the float value."""
    found, stack = [], [(value, False)] if value is not None else []
    while stack:
        current, quantized = stack.pop()
        for user, _ in current.uses():
            if user.op_type in QUANTIZE_OPS:
                stack.append((user.outputs[0], True))
            elif user.op_type in SHARED_OPS and user.domain in ("", "ai.onnx"):
                stack.append((user.outputs[0], quantized))
            elif (quantized or user.op_type in SELF_QUANTIZING_OPS) and user.name not in found:
                found.append(user.name)
    return found


def _measured_upstream(node: ir.Node, measured: dict[str, float]) -> set[str]:
    """The nearest measured tensors feeding ``node``, looking through unmeasured float ops."""
    found, stack, seen = set(), list(node.inputs), set()
    while stack:
        value = stack.pop()
        if value is None or value in seen:
            continue
        seen.add(value)
        if value.name in measured:
            found.add(value.name)
        elif value.producer() is not None:
            stack.extend(value.producer().inputs)
    return found


# Below this SQNR drop against its inputs a layer is not blamed: the error arises elsewhere.
MIN_BLAME_DROP_DB = 0.1


def blame(rows: list[dict]) -> dict | None:
    """The layer that adds the most noise (a 100 -> 40 dB first layer adds far less than a 20 -> 15 dB one);
    None if none of them measurably adds any."""
    worst = max(rows, key=lambda r: r["added_noise"], default=None)
    return worst if worst is not None and worst["sqnr_drop_db"] >= MIN_BLAME_DROP_DB else None
