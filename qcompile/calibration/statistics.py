"""Statistics the calibration runner accumulates (`qcompile.calibration.runner.Statistic`), each with a
memory bound that does not grow with the number of samples.

NaN and Inf values are excluded from ranges and histograms and counted.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import UsageError

# Elements folded into the statistics at a time: bounds the temporaries for very large activations.
CHUNK = 1 << 20


def _as_float(array, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind != "f" and "float" not in array.dtype.name:  # ml_dtypes: bfloat16, float8_*
        raise UsageError(f"calibration: tensor {name!r} is {array.dtype}, not a float tensor")
    return array.reshape(-1)


def _finite_chunks(flat: np.ndarray, dtype: type = np.float64) -> Iterator[tuple[np.ndarray, int]]:
    """(finite values as ``dtype``, count of non-finite ones) per chunk of at most CHUNK elements."""
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start:start + CHUNK].astype(dtype, copy=False)
        lo, hi = chunk.min(), chunk.max()
        if np.isfinite(lo) and np.isfinite(hi):  # NaN propagates through min/max, Inf shows in them
            yield chunk, 0
        else:
            finite = chunk[np.isfinite(chunk)]
            yield finite, chunk.size - finite.size


class RangeStatistic:
    """Min/max (and their moving averages over batches) of the finite values; O(1) memory."""

    def __init__(self, name: str, moving_average: float | None = None):
        self.name = name
        self.moving_average = moving_average
        self.min, self.max = math.inf, -math.inf
        self.ema_min = self.ema_max = None
        self.nonfinite = 0
        self.samples = 0

    def memory_bytes(self) -> int:
        return 64

    def update(self, array: np.ndarray, samples: int) -> None:
        flat = _as_float(array, self.name)
        batch_min, batch_max = math.inf, -math.inf
        # min and max are exact in any float type: no float64 copy (it was a third of calibration's time)
        native = flat.dtype if flat.dtype in (np.float32, np.float64) else np.float32
        for values, nonfinite in _finite_chunks(flat, native):
            self.nonfinite += nonfinite
            if values.size:
                batch_min, batch_max = min(batch_min, float(values.min())), max(batch_max, float(values.max()))
        self.samples += samples
        if batch_min > batch_max:
            return  # nothing finite in this batch
        self.min, self.max = min(self.min, batch_min), max(self.max, batch_max)
        if self.moving_average is not None:
            c = self.moving_average
            if self.ema_min is None:
                self.ema_min, self.ema_max = batch_min, batch_max
            else:
                self.ema_min += c * (batch_min - self.ema_min)
                self.ema_max += c * (batch_max - self.ema_max)

    @property
    def finite(self) -> bool:
        return self.min <= self.max

    @property
    def lo(self) -> float:
        return (self.ema_min if self.ema_min is not None else self.min) if self.finite else 0.0

    @property
    def hi(self) -> float:
        return (self.ema_max if self.ema_max is not None else self.max) if self.finite else 0.0

    @property
    def observed(self) -> tuple[float, float]:
        """The finite values' min and max ([0, 0] if there were none)."""
        return (float(self.min), float(self.max)) if self.finite else (0.0, 0.0)


class MeanStatistic:
    """Mean over ``axis`` (a sum and a row count) for each shape the other axes take: one sample's worth
    of memory per distinct shape (images of several sizes give several means)."""

    def __init__(self, axis: int = 0):
        self.axis = axis
        self.sums: dict[tuple[int, ...], tuple[np.ndarray, int]] = {}

    def memory_bytes(self) -> int:
        return sum(total.nbytes for total, _ in self.sums.values())

    def update(self, array: np.ndarray, samples: int) -> None:
        array = np.asarray(array)
        if array.ndim <= self.axis:
            return  # a scalar has no rows
        total = array.sum(axis=self.axis).astype(np.float64)  # float64 across batches; a float32 copy costs more
        before, rows = self.sums.get(total.shape, (0.0, 0))
        self.sums[total.shape] = (before + total, rows + array.shape[self.axis])

    def by_shape(self) -> list[tuple[np.ndarray, int]]:
        """(mean, rows) for each shape seen; the means hold NaN / Inf where the data had them."""
        return [((total / rows).astype(np.float32), rows) for total, rows in self.sums.values() if rows]

    def result(self) -> np.ndarray | None:
        """The mean, or None where the shape varied (see `by_shape`) or nothing was seen."""
        means = self.by_shape()
        return means[0][0] if len(means) == 1 else None


@dataclass
class HistogramStatistic:
    """Counts of x (or |x|, ``folded``) in ``len(counts)`` equal bins over [start, stop], a range a first
    pass over the data found (`over`)."""

    start: float
    stop: float
    folded: bool
    counts: np.ndarray = field(repr=False)

    @classmethod
    def over(cls, stats: RangeStatistic, bins: int, folded: bool) -> HistogramStatistic | None:
        """A histogram over the pass-1 range, or None when that range is a single point."""
        if not stats.finite or stats.min == stats.max:
            return None
        start, stop = (0.0, max(-stats.min, stats.max)) if folded else (stats.min, stats.max)
        return cls(start, stop, folded, np.zeros(bins, np.int64))

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.start, self.stop, len(self.counts) + 1)

    @property
    def width(self) -> float:
        return (self.stop - self.start) / len(self.counts)

    def memory_bytes(self) -> int:
        return self.counts.nbytes

    def update(self, array: np.ndarray, samples: int) -> None:
        flat = np.asarray(array).reshape(-1)
        bins = len(self.counts)
        for values, _ in _finite_chunks(flat):
            if self.folded:
                values = np.abs(values)
            index = ((values - self.start) * (bins / (self.stop - self.start))).astype(np.int64)
            np.clip(index, 0, bins - 1, out=index)  # the max lands in the last bin; pass 2 may differ a hair
            self.counts += np.bincount(index, minlength=bins)




class ChannelMax:
    """max x (or max |x|, ``absolute``) per index of ``axis``, over everything else."""

    def __init__(self, axis: int, absolute: bool = False):
        self.axis, self.absolute = axis, absolute
        self.value: np.ndarray | None = None

    def memory_bytes(self) -> int:
        return 0 if self.value is None else self.value.nbytes

    def update(self, array: np.ndarray, samples: int) -> None:
        array = np.abs(array) if self.absolute else np.asarray(array)
        batch = array.max(axis=_other_axes(array.ndim, self.axis)).astype(np.float64)
        self.value = batch if self.value is None else np.maximum(self.value, batch)


class ChannelMeanSquare:
    """E[x^2] per index of ``axis``: each batch's mean over everything else, weighted by its samples."""

    def __init__(self, axis: int):
        self.axis = axis
        self.total: np.ndarray | None = None
        self.samples = 0

    def memory_bytes(self) -> int:
        return 0 if self.total is None else self.total.nbytes

    def update(self, array: np.ndarray, samples: int) -> None:
        array = np.asarray(array)
        batch = np.mean(self._of(array), axis=_other_axes(array.ndim, self.axis)).astype(np.float64) * samples
        self.total = batch if self.total is None else self.total + batch
        self.samples += samples

    @staticmethod
    def _of(array: np.ndarray) -> np.ndarray:
        return np.square(array)

    @property
    def value(self) -> np.ndarray | None:
        return None if self.total is None else self.total / max(self.samples, 1)


class ChannelMeanAbs(ChannelMeanSquare):
    """E[|x|] per index of ``axis``, as `ChannelMeanSquare` weighs batches."""

    @staticmethod
    def _of(array: np.ndarray) -> np.ndarray:
        return np.abs(array)


class Gram:
    """X^T X of the rows of x (the last axis is the feature axis, every other one indexes rows), and the
    row count: the Hessian of a linear layer's squared error that GPTQ needs. features^2 float64."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.rows = 0

    def memory_bytes(self) -> int:
        return 0 if self.total is None else self.total.nbytes

    def update(self, array: np.ndarray, samples: int) -> None:
        rows = np.asarray(array, np.float64).reshape(-1, np.shape(array)[-1])
        if self.total is None:
            self.total = rows.T @ rows
        else:
            self.total += rows.T @ rows
        self.rows += rows.shape[0]


def _other_axes(rank: int, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(rank) if a != axis % rank)
