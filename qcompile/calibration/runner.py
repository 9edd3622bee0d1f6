"""One calibration runner: a model in memory, one data source, pluggable statistics.

An analysis asks for statistics of some values of the model (`qcompile.calibration.statistics`:
ranges, histograms, means, per-channel maxima, X^T X); `CalibrationRunner.run` makes those values
extra outputs of the model for the length of one session, runs ONNX Runtime over the data batch by
batch, hands each batch's arrays to the statistics and drops them. Memory is one batch of the
observed activations plus what each statistic states as its bound (`Statistic.memory_bytes`).

The model is written to a temporary file for ONNX Runtime (never read back) with the observed values
as extra graph outputs, which are taken off again at once; a later run that observes no other values
(the second pass of the histogram methods) reuses that session. Initializers named ``replaceable``
are listed as graph inputs in that file too, so a run may feed other values for them (GPTQ calibrates
each layer on the model whose earlier layers are already quantized) without saving the model again.
"""
from __future__ import annotations

import logging
import tempfile
import zipfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from qcompile import progress
from qcompile.data import InputInfo, count_samples, iterate_batches, model_inputs
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.memory import return_freed_memory
from qcompile.session import run, session

logger = logging.getLogger(__name__)


class Statistic(Protocol):
    """Something accumulated over the calibration data, one batch at a time."""

    def update(self, array: np.ndarray, samples: int) -> None:
        """Fold in one batch of the observed value (``samples`` samples)."""

    def memory_bytes(self) -> int:
        """The memory it holds: bounded by the shape of what it observes, not the number of batches."""


@dataclass(frozen=True)
class CalibrationData:
    """The calibration data of one compile, shared by every pass that reads it: where it lies, how many
    samples to take (``limit``) and the seed of `random` data."""

    path: str
    limit: int | None = None
    seed: int = 0

    def batches(self, inputs: list[InputInfo]):
        return iterate_batches(self.path, inputs, self.limit, self.seed)

    def samples(self, inputs: list[InputInfo]) -> int | None:
        """Samples a run will see, if the data tell without reading them all."""
        try:
            return count_samples(self.path, inputs, self.limit)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # iterate_batches reports bad data as a UsageError

    def __str__(self) -> str:
        return self.path


class CalibrationRunner:
    """Runs ``model`` over ``data`` and feeds statistics of its values."""

    def __init__(self, model: ir.Model, data: CalibrationData, replaceable: Collection[ir.Value] = ()):
        self.model = model
        self.data = data
        self.replaceable = list(replaceable)
        self.inputs = model_inputs(model)
        self._fetchable: set[ir.Value] = set()
        self._session = None
        self._folder = None  # the session's model file; removed with the runner

    def run(self, observed: Mapping[ir.Value, Sequence[Statistic]], description: str,
            replacements: Mapping[ir.Value, np.ndarray] | None = None) -> None:
        """One pass over the data: each statistic of ``observed[value]`` sees every batch of ``value``
        (a graph input, a node output or a constant of the main graph). ``replacements``: values that
        ``replaceable`` initializers take instead of their own for this run."""
        replaced = {v.name: array for v, array in (replacements or {}).items()}
        if not set(replaced) <= {v.name for v in self.replaceable}:
            raise ValueError(f"not replaceable: {sorted(set(replaced) - {v.name for v in self.replaceable})}")
        fed = {i.name for i in self.inputs}
        values = list(observed)
        unreadable = [v for v in values if v.dtype is not None and not v.dtype.is_floating_point()]
        if unreadable:
            raise UsageError(f"calibration: tensor {unreadable[0].name!r} is {unreadable[0].dtype.name}, "
                             f"not a float tensor")
        constants = {v: v.const_value.numpy() for v in values if v.name not in fed and v.const_value is not None}
        fetch = [v for v in values if v.name not in fed and v not in constants]
        sess = self._session_for(fetch)
        with progress.task(description, self.data.samples(self.inputs)) as advance:
            names = [v.name for v in fetch]
            # One batch's activations are alive at a time: they are dropped before the next batch runs.
            for feed in self.data.batches(self.inputs):
                count = batch_samples(feed, self.inputs)
                fetched = dict(zip(fetch, run(sess, names, {**feed, **replaced}, "the model on calibration data"))) \
                    if fetch else {}
                _update(observed, {**{v: feed[v.name] for v in values if v.name in fed}, **constants, **fetched}, count)
                del fetched
                advance(count)
        held = sum(s.memory_bytes() for stats in observed.values() for s in stats)
        logger.info("%s: %d tensors on %s; the statistics hold %.1f MB", description, len(values), self.data, held / 1e6)

    def close(self) -> None:
        """Drop the session and its copy of the model until a run needs one (for a large model, the weights'
        size in memory, and on disk)."""
        self._session = self._folder = None

    def _session_for(self, fetch: list[ir.Value]):
        """A session whose outputs include ``fetch``: the last one where it does, else a new one."""
        if self._session is None or not set(fetch) <= self._fetchable:
            self._session = None  # not two sessions of the model alive at once
            graph = self.model.graph
            added = [v for v in dict.fromkeys(fetch) if v not in set(graph.outputs)]
            fed = [v for v in self.replaceable if v not in set(graph.inputs)]
            self._folder = tempfile.TemporaryDirectory(prefix="qcompile-calib-")
            graph.outputs.extend(added)
            graph.inputs.extend(fed)
            try:
                path = save_model(self.model, Path(self._folder.name) / "calibration.onnx")
            finally:
                for value in added:
                    graph.outputs.remove(value)
                for value in fed:
                    graph.inputs.remove(value)
            return_freed_memory()  # before the session allocates a copy of the weights
            self._session, self._fetchable = session(path), set(fetch)
        return self._session


def _update(observed: Mapping[ir.Value, Sequence[Statistic]], arrays: dict[ir.Value, np.ndarray], count: int) -> None:
    for value, statistics in observed.items():
        for statistic in statistics:
            statistic.update(arrays[value], count)


def batch_samples(feed: dict[str, np.ndarray], inputs: list[InputInfo]) -> int:
    """Samples in one feed: `iterate_batches` batches along axis 0 only when every input is batched."""
    if inputs and all(i.batched for i in inputs):
        return int(feed[inputs[0].name].shape[0])
    return 1

