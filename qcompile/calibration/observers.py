"""Activation ranges from calibration data: the observers that turn statistics into a range for a grid.

`calibrate_ranges` runs the `CalibrationRunner` once (MINMAX) or twice, with range, histogram and mean
statistics (`qcompile.calibration.statistics`): memory is O(len(tensors) x num_bins) plus one batch
of activations (and, per tensor, temporaries of at most `CHUNK` elements while a batch is folded in).

MINMAX needs one pass over the data. The histogram methods (PERCENTILE, ENTROPY, MSE) need two: pass 1
finds each tensor's min/max, pass 2 fills a fixed histogram of `num_bins` bins over that range (of |x|
for ENTROPY and when the range will be used symmetrically, of x otherwise), from which the range is
chosen:

* PERCENTILE: the `percentile` of |x| (symmetric), or the (100 - p)th and pth percentiles of x.
* ENTROPY: TensorRT's KL-divergence calibration on the |x| histogram: the clipping threshold whose
  clipped distribution (outliers folded into the last bin) loses least information when quantized
  to the levels of the tensor's grid (`IntegerGrid.levels`: 128 for 8 bits, 256 when an asymmetric
  tensor is one-signed, e.g. after a ReLU). Thresholds start
  at as many bins as levels (as in TensorRT): with 2048 bins no lower than 1/16 (1/8) of the max. The zero
  bin is discounted (exact zeros are exact at any threshold). An asymmetric tensor gets
  [max(min, -t), min(max, t)].
* MSE: the clipping range minimizing the expected squared error (clipping + rounding) of the tensor's
  grid (8 bits: 127 steps over [0, t] for symmetric use, 255 steps over [lo, hi] otherwise), computed
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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile.calibration.runner import CalibrationRunner
from qcompile.calibration.statistics import HistogramStatistic, MeanStatistic, RangeStatistic
from qcompile.decisions import IntegerGrid
from qcompile.errors import UsageError

logger = logging.getLogger(__name__)

# The grid a tensor is calibrated for where the caller names none.
DEFAULT_GRID = IntegerGrid(ir.DataType.UINT8)
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


def _folds(method: Method, symmetric: bool) -> bool:
    """Whether the method works on |x| for this tensor (all symmetric uses; ENTROPY always)."""
    return symmetric or method == Method.ENTROPY


def calibrate_ranges(runner: CalibrationRunner, values: Sequence[ir.Value], options: CalibrationOptions,
                     symmetric: Mapping[ir.Value, bool] | None = None,
                     grids: Mapping[ir.Value, IntegerGrid] | None = None,
                     means: Collection[ir.Value] = ()) -> dict[ir.Value, TensorRange]:
    """Calibrated ranges of ``values`` (graph inputs / node outputs of the main graph) over the runner's data.

    ``symmetric[value]`` tells that the range will be used symmetrically: the histogram methods then
    work on |x| and return lo = -hi. ``grids[value]`` is the grid the range is for (`DEFAULT_GRID`
    where not given): entropy and mse weigh clipping against its steps. The values in ``means`` also
    get their `TensorRange.mean`.
    """
    symmetric, grids = symmetric or {}, grids or {}
    values = list(dict.fromkeys(values))
    two_pass = options.method != Method.MINMAX
    logger.info("calibrating %d tensors (%s)", len(values), options.method.value)
    stats = {v: RangeStatistic(v.name, options.moving_average) for v in values}
    averages = {v: MeanStatistic() for v in values if v in means}
    runner.run({v: [stats[v], *([averages[v]] if v in averages else [])] for v in values},
               "calibrating (pass 1/2)" if two_pass else "calibrating")
    hists = {}
    if two_pass:  # constant tensors need no histogram (`over` gives None)
        hists = {v: HistogramStatistic.over(stats[v], options.num_bins, _folds(options.method, symmetric.get(v, False)))
                 for v in values}
        hists = {v: h for v, h in hists.items() if h is not None}
        runner.run({v: [h] for v, h in hists.items()}, "calibrating (pass 2/2)")
    ranges = {}
    for v in values:
        lo, hi = _choose(options, stats[v], hists.get(v), symmetric.get(v, False), grids.get(v, DEFAULT_GRID))
        mean = averages[v].result() if v in averages else None
        ranges[v] = TensorRange(float(lo), float(hi), *stats[v].observed, stats[v].nonfinite, stats[v].samples,
                                mean if mean is not None and np.isfinite(mean).all() else None)
        logger.debug("%s: [%g, %g] (observed %s)", v.name, lo, hi, stats[v].observed)
    return ranges


def _choose(options: CalibrationOptions, stats: RangeStatistic, hist: HistogramStatistic | None,
            symmetric: bool, grid: IntegerGrid) -> tuple[float, float]:
    """The calibrated (lo, hi) of one tensor from its statistics, for ``grid``."""
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
        t = hist.start + kl_threshold_bins(hist.counts, grid.levels(one_sided)) * hist.width
        return (-t, t) if symmetric else (max(stats.min, -t), min(stats.max, t))
    if symmetric:
        _, hi = _mse_range(hist, grid.levels() - 1, search_lo=False)
        return -hi, hi
    return _mse_range(hist, grid.levels(one_sided=True) - 1, search_lo=True)


def _quantile(hist: HistogramStatistic, q: float) -> float:
    """The q-quantile of the histogram's values, interpolated linearly inside its bin."""
    cdf = np.cumsum(hist.counts)
    target = q * cdf[-1]
    j = min(int(np.searchsorted(cdf, target, side="left")), len(cdf) - 1)
    before = cdf[j - 1] if j else 0
    fraction = (target - before) / hist.counts[j] if hist.counts[j] else 1.0
    return float(np.clip(hist.start + (j + fraction) * hist.width, hist.start, hist.stop))


def kl_threshold_bins(counts: np.ndarray, levels: int = 128) -> int:
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


def _mse_range(hist: HistogramStatistic, steps: int, search_lo: bool) -> tuple[float, float]:
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
