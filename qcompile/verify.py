"""Numerical comparison of a compiled model against its reference, streamed over the data."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from qcompile import progress
from qcompile.data import InputInfo, count_samples, iterate_batches
from qcompile.session import run, session


@dataclass
class OutputError:
    name: str
    sqnr_db: float
    cosine: float
    max_abs: float


class _Accumulator:
    """Running sums for SQNR (signal / error energy), per-sample cosine and max |error|."""

    def __init__(self):
        self.signal = self.noise = 0.0
        self.cosines: list[float] = []
        self.max_abs = 0.0

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

    def result(self, name: str) -> OutputError:
        sqnr = float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
        return OutputError(name, sqnr, float(np.mean(self.cosines)), self.max_abs)


def compare_models(reference: str | os.PathLike, candidate: str | os.PathLike, data: str,
                   inputs: list[InputInfo], limit: int | None = None, seed: int = 0) -> dict:
    """Run both models on ``data``; per-output errors of the candidate and both models' latency."""
    ref_session, cand_session = session(reference), session(candidate)
    names = [o.name for o in ref_session.get_outputs()]
    accumulators = {name: _Accumulator() for name in names}
    ref_times, cand_times = [], []
    feeds = progress.track(iterate_batches(data, inputs, limit, seed), "verifying",
                           total=None)
    for feed in feeds:
        start = time.perf_counter()
        ref_outputs = run(ref_session, names, feed, f"{reference} on {data}")
        mid = time.perf_counter()
        cand_outputs = run(cand_session, names, feed, f"{candidate} on {data}")
        ref_times.append(mid - start)
        cand_times.append(time.perf_counter() - mid)
        for name, ref, cand in zip(names, ref_outputs, cand_outputs):
            accumulators[name].add(ref, cand)
    if not ref_times:
        return {"outputs": [], "samples": 0}
    ref_ms, cand_ms = 1e3 * statistics.median(ref_times), 1e3 * statistics.median(cand_times)
    return {
        "samples": count_samples(data, inputs, limit),
        "outputs": [asdict(acc.result(name)) for name, acc in accumulators.items()],
        "latency_ms": {"reference": ref_ms, "candidate": cand_ms, "ratio": cand_ms / ref_ms},
    }
