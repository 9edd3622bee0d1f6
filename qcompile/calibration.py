"""Streaming calibration: per-tensor activation ranges from running the model on calibration data.

The requested tensors are made extra graph outputs of a temporary copy of the model, which ONNX
Runtime runs batch by batch over the data (`qcompile.data.iterate_batches`). Each batch updates small
per-tensor statistics and is then dropped, so memory is bounded independently of the number of
samples: O(len(tensors) x num_bins) for the statistics, plus one batch of activations (and, per
tensor, temporaries of at most `CHUNK` elements while a batch is folded in).

MINMAX needs one pass over the data. The histogram methods (PERCENTILE, ENTROPY, MSE) need two: pass 1
finds each tensor's min/max, pass 2 fills a fixed histogram of `num_bins` bins over that range (of |x|
for ENTROPY and when the range will be used symmetrically, of x otherwise), from which the range is
chosen:

* PERCENTILE: the `percentile` of |x| (symmetric), or the (100 - p)th and pth percentiles of x.
* ENTROPY: TensorRT's KL-divergence calibration on the |x| histogram: the clipping threshold whose
  clipped distribution (outliers folded into the last bin) loses least information when quantized
  to 128 levels (256 when an asymmetric tensor is one-signed, e.g. after a ReLU). Thresholds start
  at as many bins as levels (as in TensorRT): with 2048 bins no lower than 1/16 (1/8) of the max. The zero
  bin is discounted (exact zeros are exact at any threshold). An asymmetric tensor gets
  [max(min, -t), min(max, t)].
* MSE: the clipping range minimizing the expected squared error (clipping + rounding) of an 8-bit
  grid (127 steps over [0, t] for symmetric use, 255 steps over [lo, hi] otherwise), computed
  from the histogram with the mass of each bin spread uniformly across it.

NaN and Inf values are excluded from all statistics and counted. A tensor without finite values
gets the range [0, 0]; a constant one [v, v]: never NaN.

On request, the same run also gives a tensor's mean over axis 0 (one sample's worth of memory), so a
later pass that needs the mean input of a layer (bias correction) does not run the model again.
"""
from __future__ import annotations

import enum
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile import progress
from qcompile.data import InputInfo, count_samples, iterate_batches, model_inputs
from qcompile.errors import UsageError
from qcompile.io import load_model, save_model
from qcompile.session import run, session

logger = logging.getLogger(__name__)

# Elements folded into the statistics at a time: bounds the temporaries for very large activations.
CHUNK = 1 << 20
# value.meta key: a tensor's mean over axis 0 on the calibration data (float32, the other axes' shape).
MEAN_KEY = "qcompile.calibration_mean"
# Quantization levels (KL) and grid steps (MSE) of an 8-bit grid.
_KL_LEVELS_SIGNED, _KL_LEVELS_ONE_SIDED = 128, 256
_MSE_STEPS_SYMMETRIC, _MSE_STEPS_ASYMMETRIC = 127, 255
# Candidates on the coarse grid of the threshold searches (each costs O(num_bins)).
_SEARCH_GRID = 64
# Probability given to a bin that P has and Q lacks, so KL(P||Q) stays finite (as MXNet / TensorRT do).
_KL_EPSILON = 1e-4


class Method(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


@dataclass(frozen=True)
class CalibrationOptions:
    method: Method = Method.MINMAX
    percentile: float = 99.999  # PERCENTILE: of |x| (symmetric) or of each tail (asymmetric)
    num_bins: int = 2048  # histogram bins for PERCENTILE / ENTROPY / MSE
    moving_average: float | None = None  # MINMAX: EMA constant for per-batch min/max (e.g. 0.01)
    limit: int | None = None  # max samples
    seed: int = 0

    def __post_init__(self):
        try:
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise UsageError(f"unknown calibration method {self.method!r} "
                             f"(choose from {', '.join(m.value for m in Method)})") from None
        if not 0 < self.percentile <= 100:
            raise UsageError(f"calibration percentile must be in (0, 100], got {self.percentile}")
        if self.num_bins < 2:
            raise UsageError(f"calibration num_bins must be at least 2, got {self.num_bins}")
        if self.moving_average is not None and not 0 < self.moving_average <= 1:
            raise UsageError(f"calibration moving_average must be in (0, 1], got {self.moving_average}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"calibration size must be at least 1, got {self.limit}")


@dataclass(frozen=True)
class TensorRange:
    lo: float  # calibrated range; may exclude 0 (the caller widens it)
    hi: float
    observed_min: float  # of the finite values
    observed_max: float
    nonfinite: int  # NaN/Inf values seen (excluded from the statistics)
    samples: int
    # Over axis 0, where asked for and the other axes kept one shape with finite values throughout.
    mean: np.ndarray | None = field(default=None, compare=False, repr=False)


def calibrate(model_path: str | os.PathLike, tensors: Sequence[str], data: str, options: CalibrationOptions,
              symmetric: Mapping[str, bool] | None = None, means: Collection[str] = ()) -> dict[str, TensorRange]:
    """Calibrated ranges of ``tensors`` (graph inputs / node outputs of the main graph) over ``data``.

    ``symmetric[name]`` tells that the range will be used symmetrically: the histogram methods then
    work on |x| and return lo = -hi. The tensors in ``means`` also get their `TensorRange.mean`.
    """
    symmetric = symmetric or {}
    names = list(dict.fromkeys(tensors))
    model = load_model(model_path)
    inputs = model_inputs(model)
    fed = {i.name for i in inputs}
    constants = _expose(model, names, fed)
    fetch = [n for n in names if n not in constants and n not in fed]

    total = _sample_count(data, inputs, options)
    two_pass = options.method != Method.MINMAX
    logger.info("calibrating %d tensors on %s (%s, %s samples)", len(names), data, options.method.value, total)

    with tempfile.TemporaryDirectory(prefix="qcompile-calib-") as tmp:
        path = save_model(model, Path(tmp) / "calibration.onnx")
        del model  # the session reads the copy; do not keep the graph (or its weights) alive
        sess = session(path)

        def each_batch(description: str, handle: Callable[[dict[str, np.ndarray], int], None]) -> None:
            _each_batch(sess, fetch, constants, data, inputs, options, progress.task(description, total), handle)

        stats = {n: _RangeStats(options.moving_average) for n in names}
        averages = {n: _Mean() for n in names if n in means}

        def take_ranges(arrays: dict[str, np.ndarray], count: int) -> None:
            for name in names:
                stats[name].update(_as_float(arrays[name], name), count)
            for name, average in averages.items():
                average.update(arrays[name])

        each_batch("calibrating (pass 1/2)" if two_pass else "calibrating", take_ranges)
        hists = {}
        if two_pass:  # constant tensors need no histogram (`over` gives None)
            hists = {n: _Histogram.over(stats[n], options.num_bins, _folds(options.method, symmetric.get(n, False)))
                     for n in names}
            hists = {n: h for n, h in hists.items() if h is not None}

            def take_histograms(arrays: dict[str, np.ndarray], _count: int) -> None:
                for name, hist in hists.items():
                    hist.update(_as_float(arrays[name], name))

            each_batch("calibrating (pass 2/2)", take_histograms)
    ranges = {}
    for name in names:
        lo, hi = _choose(options, stats[name], hists.get(name), symmetric.get(name, False))
        ranges[name] = stats[name].result(lo, hi, averages[name].result() if name in averages else None)
        logger.debug("%s: [%g, %g] (observed [%g, %g])", name, lo, hi, ranges[name].observed_min,
                     ranges[name].observed_max)
    return ranges


def reduce_outputs(model_path: str | os.PathLike, inputs: list[InputInfo], outputs: Mapping[str, str], data: str,
                   options: CalibrationOptions, description: str) -> dict[str, np.ndarray]:
    """Per-batch reduced graph outputs, combined over ``data``: ``outputs`` maps each name to "mean"
    (sample-weighted) or "max".

    Each output must already be reduced over the batch axis by the model (a ReduceMean or ReduceMax),
    so memory stays bounded by one batch whatever the number of samples.
    """
    sess = session(model_path)
    total = _sample_count(data, inputs, options)
    combined, seen = {}, 0

    def combine(arrays: dict[str, np.ndarray], count: int) -> None:
        nonlocal seen
        for name, how in outputs.items():
            array = arrays[name].astype(np.float64)
            if how == "mean":
                combined[name] = combined.get(name, 0.0) + count * array
            else:
                combined[name] = np.maximum(combined[name], array) if name in combined else array
        seen += count

    _each_batch(sess, list(outputs), {}, data, inputs, options, progress.task(description, total), combine)
    return {name: value / max(seen, 1) if outputs[name] == "mean" else value for name, value in combined.items()}


def _expose(model: ir.Model, names: list[str], fed: set[str]) -> dict[str, np.ndarray]:
    """Make each named value readable after a run: node outputs become graph outputs.

    Fed inputs are read from the feed. Returns the values that are constants (initializers that are
    not fed); they are read directly.
    """
    graph = model.graph
    values = dict(graph.initializers)
    values.update((v.name, v) for v in graph.inputs)
    values.update((v.name, v) for node in graph for v in node.outputs)
    missing = [n for n in names if n not in values]
    if missing:
        raise UsageError(f"calibration: no tensor{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                         f"in the main graph of the model (graph inputs and node outputs)")
    constants = {}
    outputs = set(graph.outputs)
    for name in names:
        value = values[name]
        if value.dtype is not None and not value.dtype.is_floating_point():
            raise UsageError(f"calibration: tensor {name!r} is {value.dtype.name}, not a float tensor")
        if name in fed:
            continue
        if value.const_value is not None:
            constants[name] = value.const_value.numpy()
        elif value not in outputs:
            graph.outputs.append(value)
            outputs.add(value)
    return constants


def _each_batch(sess, fetch: list[str], constants: dict[str, np.ndarray], data: str, inputs: list[InputInfo],
                options: CalibrationOptions, task, handle: Callable[[dict[str, np.ndarray], int], None]) -> None:
    """``handle(arrays by name, samples in the batch)`` for each batch: fetched outputs, feeds and
    constants. One batch's activations are alive at a time: a generator would keep the last batch
    (in its frame and the caller's loop variable) while the next one runs, twice the memory.

    ``task`` is a `progress.task`, advanced by the samples of each batch (the bar counts samples).
    """
    with task as advance:
        for feed in iterate_batches(data, inputs, options.limit, options.seed):
            outputs = run(sess, fetch, feed, "the model on calibration data") if fetch else []
            count = _batch_samples(feed, inputs)
            handle({**feed, **constants, **dict(zip(fetch, outputs))}, count)
            del outputs
            advance(count)


def _sample_count(data: str, inputs: list[InputInfo], options: CalibrationOptions) -> int | None:
    """Samples the progress bar expects, if the data tell without reading them all."""
    try:
        return count_samples(data, inputs, options.limit)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # iterate_batches reports bad data as a UsageError


def _batch_samples(feed: dict[str, np.ndarray], inputs: list[InputInfo]) -> int:
    """Samples in one feed: `iterate_batches` batches along axis 0 only when every input is batched."""
    if inputs and all(i.batched for i in inputs):
        return int(feed[inputs[0].name].shape[0])
    return 1


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


class _RangeStats:
    """Pass 1: min/max (and their moving averages over batches) of the finite values; O(1) memory."""

    def __init__(self, moving_average: float | None = None):
        self.moving_average = moving_average
        self.min, self.max = math.inf, -math.inf
        self.ema_min = self.ema_max = None
        self.nonfinite = 0
        self.samples = 0

    def update(self, flat: np.ndarray, samples: int) -> None:
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

    def result(self, lo: float, hi: float, mean: np.ndarray | None = None) -> TensorRange:
        observed = (self.min, self.max) if self.finite else (0.0, 0.0)
        return TensorRange(float(lo), float(hi), float(observed[0]), float(observed[1]), self.nonfinite,
                           self.samples, mean)


class _Mean:
    """Mean over axis 0 (a sum and a row count); none once the other axes change shape."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.rows = 0
        self.varied = False

    def update(self, array) -> None:
        array = np.asarray(array)
        if self.varied or array.ndim == 0:
            self.varied = True
            return
        total = array.sum(axis=0).astype(np.float64)  # float64 across batches; a float32 copy costs more
        if self.total is not None and self.total.shape != total.shape:
            self.varied, self.total = True, None
            return
        self.total = total if self.total is None else self.total + total
        self.rows += array.shape[0]

    def result(self) -> np.ndarray | None:
        if self.varied or self.total is None or not self.rows or not np.isfinite(self.total).all():
            return None
        return (self.total / self.rows).astype(np.float32)


def _folds(method: Method, symmetric: bool) -> bool:
    """Whether the method works on |x| for this tensor (all symmetric uses; ENTROPY always)."""
    return symmetric or method == Method.ENTROPY


@dataclass
class _Histogram:
    """Pass 2: counts of x (or |x|, ``folded``) in ``len(counts)`` equal bins over [start, stop]."""

    start: float
    stop: float
    folded: bool
    counts: np.ndarray = field(repr=False)

    @classmethod
    def over(cls, stats: _RangeStats, bins: int, folded: bool) -> _Histogram | None:
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

    def update(self, flat: np.ndarray) -> None:
        bins = len(self.counts)
        for values, _ in _finite_chunks(flat):
            if self.folded:
                values = np.abs(values)
            index = ((values - self.start) * (bins / (self.stop - self.start))).astype(np.int64)
            np.clip(index, 0, bins - 1, out=index)  # the max lands in the last bin; pass 2 may differ a hair
            self.counts += np.bincount(index, minlength=bins)


def _choose(options: CalibrationOptions, stats: _RangeStats, hist: _Histogram | None,
            symmetric: bool) -> tuple[float, float]:
    """The calibrated (lo, hi) of one tensor from its statistics."""
    if options.method == Method.MINMAX:
        return stats.lo, stats.hi
    if hist is None:  # no finite values, or a constant
        lo, hi = stats.lo, stats.hi
        return (-max(-lo, hi), max(-lo, hi)) if symmetric else (lo, hi)
    if options.method == Method.PERCENTILE:
        q = options.percentile / 100
        if symmetric:
            hi = _quantile(hist, q)
            return -hi, hi
        return _quantile(hist, 1 - q), _quantile(hist, q)
    if options.method == Method.ENTROPY:
        one_sided = not symmetric and (stats.min >= 0 or stats.max <= 0)
        levels = _KL_LEVELS_ONE_SIDED if one_sided else _KL_LEVELS_SIGNED
        t = hist.start + kl_threshold_bins(hist.counts, levels) * hist.width
        return (-t, t) if symmetric else (max(stats.min, -t), min(stats.max, t))
    if symmetric:
        _, hi = _mse_range(hist, _MSE_STEPS_SYMMETRIC, search_lo=False)
        return -hi, hi
    return _mse_range(hist, _MSE_STEPS_ASYMMETRIC, search_lo=True)


def _quantile(hist: _Histogram, q: float) -> float:
    """The q-quantile of the histogram's values, interpolated linearly inside its bin."""
    cdf = np.cumsum(hist.counts)
    target = q * cdf[-1]
    j = min(int(np.searchsorted(cdf, target, side="left")), len(cdf) - 1)
    before = cdf[j - 1] if j else 0
    fraction = (target - before) / hist.counts[j] if hist.counts[j] else 1.0
    return float(np.clip(hist.start + (j + fraction) * hist.width, hist.start, hist.stop))


def kl_threshold_bins(counts: np.ndarray, levels: int = _KL_LEVELS_SIGNED) -> int:
    """TensorRT's entropy calibration: the number ``i`` of leading bins to keep (threshold = bin edge i).

    For each candidate i: P = counts[:i] with the outliers (counts[i:]) folded into its last bin;
    Q = counts[:i] merged into ``levels`` groups, each group's mass spread evenly over the bins
    where P is nonzero. The chosen i minimizes KL(P || Q) (searched coarse to fine). A bin P has and
    Q lacks (folded outliers where the histogram itself is empty) gets probability _KL_EPSILON in Q.
    Zeros are exact whatever the threshold: bin 0 takes bin 1's count, so that the spike of zeros a
    ReLU makes does not decide the threshold (as NVIDIA's pytorch-quantization does).
    """
    counts = np.asarray(counts, np.float64).copy()
    n = len(counts)
    if n > 1:
        counts[0] = counts[1]
    outliers = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # outliers[i] = counts[i:].sum()

    def divergence(i: int) -> float:
        p = counts[:i].copy()
        p[-1] += outliers[i]
        nonzero = p > 0
        groups = min(levels, i)
        starts = np.arange(groups) * i // groups  # strictly increasing: i >= groups
        mass = np.add.reduceat(counts[:i], starts)
        support = np.add.reduceat(nonzero.astype(np.int64), starts)
        per_bin = np.divide(mass, support, out=np.zeros(groups), where=support > 0)
        return _kl(p, np.repeat(per_bin, np.diff(starts, append=i)) * nonzero)

    first = min(levels, n)
    return _search(first, n, dense_at=first, cost=lambda ii: np.array([divergence(int(i)) for i in ii]))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of two unnormalized histograms; empty P bins contribute 0, empty Q bins _KL_EPSILON."""
    if q.sum() <= 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    keep = p > 0
    p, q = p[keep], np.where(q[keep] > 0, q[keep], _KL_EPSILON)
    return float(np.sum(p * np.log(p / q)))


def _candidates(first: int, last: int, dense_at: int) -> np.ndarray:
    """At most about _SEARCH_GRID indices in [first, last]: all of them, or evenly spaced ones plus ones
    crowding geometrically toward ``dense_at`` (``first`` or ``last``: the end next to 0, where the
    bulk of a heavy-tailed tensor lies)."""
    if last - first < _SEARCH_GRID:
        return np.arange(first, last + 1)
    half = _SEARCH_GRID // 2
    offsets = np.geomspace(1, last - first + 1, half) - 1
    geometric = first + offsets if dense_at == first else last - offsets
    return np.unique(np.rint(np.concatenate([np.linspace(first, last, half), geometric])).astype(np.int64))


def _search(first: int, last: int, dense_at: int, cost) -> int:
    """The index in [first, last] minimizing ``cost`` (vectorized over indices): best on a coarse grid,
    then best among all indices between that one's grid neighbours."""
    grid = _candidates(first, last, dense_at)
    k = int(np.argmin(cost(grid)))
    fine = np.arange(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)] + 1)
    return int(fine[np.argmin(cost(fine))])


def _mse_range(hist: _Histogram, steps: int, search_lo: bool) -> tuple[float, float]:
    """(lo, hi) bin edges minimizing the expected error of a ``steps``-step grid.

    Coordinate descent: the best hi for the current lo, then (``search_lo``) the best lo for that hi,
    until neither moves. Bounds on the far side of 0 are never candidates (the grid includes 0 anyway).
    """
    edges, n = hist.edges, len(hist.counts)
    zero_up = int(np.clip(np.searchsorted(edges, 0.0, side="left"), 0, n))  # first edge >= 0
    zero_down = int(np.clip(np.searchsorted(edges, 0.0, side="right") - 1, 0, n))  # last edge <= 0

    def cost(los, his):
        return expected_squared_error(hist.counts, edges, edges[los], edges[his], steps)

    lo_i, hi_i = 0, n
    for _ in range(8):
        first = max(lo_i + 1, zero_up)
        new_hi = _search(first, n, first, lambda his: cost(np.full(len(his), lo_i), his)) if first < n else n
        new_lo = lo_i
        if search_lo:
            last = min(new_hi - 1, zero_down)
            new_lo = _search(0, last, last, lambda los: cost(los, np.full(len(los), new_hi))) if last > 0 else 0
        if (new_lo, new_hi) == (lo_i, hi_i):
            break
        lo_i, hi_i = new_lo, new_hi
    return float(edges[lo_i]), float(edges[hi_i])


def expected_squared_error(counts: np.ndarray, edges: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                           steps: int) -> np.ndarray:
    """Total expected squared error of quantizing a histogram onto ``steps`` equal steps over [lo, hi].

    One result per candidate (lo[k], hi[k]), each a bin edge. The mass of each bin is taken as uniform
    across it: bins outside [lo, hi] cost their mean squared distance to the clipping bound, bins inside
    their mean squared rounding error (exact for the uniform density). The grid is widened to include
    0, as the caller will.
    """
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    n = np.asarray(counts, np.float64)
    a, b = edges[:-1], edges[1:]
    # Clipping: from prefix sums of each bin's count, first and second moment.
    moments = [np.concatenate([[0.0], np.cumsum(n * m)]) for m in (1.0, (a + b) / 2, (a * a + a * b + b * b) / 3)]
    below = np.clip(np.searchsorted(edges, lo), 0, len(n))
    above = np.clip(np.searchsorted(edges, hi), 0, len(n))
    m0, m1, m2 = (m[below] for m in moments)
    clip_low = m0 * lo * lo - 2 * lo * m1 + m2
    m0, m1, m2 = (m[-1] - m[above] for m in moments)
    clip_high = m0 * hi * hi - 2 * hi * m1 + m2
    # Rounding: clipping the offsets to [0, span] zeroes the integral over bins outside the grid.
    span = np.maximum(hi - lo, np.finfo(np.float64).tiny)[:, None]
    integral = _rounding_integral(np.clip(edges - lo[:, None], 0, span), span / steps)
    rounding = (np.diff(integral, axis=1) / (b - a)) @ n
    return clip_low + clip_high + rounding


def _rounding_integral(y: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Integral over [0, y] of (u - step * round(u / step))^2 du."""
    periods = np.floor(y / step)
    v = y - periods * step
    past_half = v - step
    partial = np.where(v <= step / 2, v * v * v / 3, step * step * step / 12 + past_half * past_half * past_half / 3)
    return periods * (step * step * step / 12) + partial
