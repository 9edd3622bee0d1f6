"""Streaming calibration: ranges against numpy references, on small models run in ONNX Runtime."""
from __future__ import annotations

import weakref

import numpy as np
import pytest

from qcompile.calibration import (CalibrationData, CalibrationOptions, CalibrationRunner, HistogramStatistic, Method,
                                  RangeStatistic, calibrate_ranges, expected_squared_error, kl_threshold_bins,
                                  runner)
from qcompile.errors import UsageError
from qcompile.io import load_model, save_model
from tests.helpers import parse


def calibrate(path, names, data, options, symmetric=None, means=(), limit=None):
    """`calibrate_ranges` on the model at ``path``, its values and results addressed by name."""
    model = load_model(path)
    graph = model.graph
    values = {v.name: v for v in [*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]}
    ranges = calibrate_ranges(CalibrationRunner(model, CalibrationData(data, limit)), [values[n] for n in names],
                              options, {values[n]: s for n, s in (symmetric or {}).items()},
                              means=[values[n] for n in means])
    return {value.name: r for value, r in ranges.items()}

# x -> h = 2x -> y = Relu(h); the batch axis is dynamic, so samples are fed 8 at a time.
CHAIN = """
<ir_version: 10, opset_import: ["" : 17]>
chain (float[N, 16] x) => (float[N, 16] y) {
    two = Constant <value = float {2.0}> ()
    h = Mul(x, two)
    y = Relu(h)
}
"""

# Two independent tensors: a = heavy * 1, b = flat * 1.
PAIR = """
<ir_version: 10, opset_import: ["" : 17]>
pair (float[N, 1000] heavy, float[N, 1000] flat) => (float[N, 1000] y) {
    one = Constant <value = float {1.0}> ()
    a = Mul(heavy, one)
    b = Mul(flat, one)
    y = Add(a, b)
}
"""


def _model(tmp_path, text: str = CHAIN, external_data: bool = False, name: str = "model.onnx") -> str:
    path = tmp_path / name
    save_model(parse(text), path, external_data=external_data)
    return str(path)


def _data(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _normal(n: int, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


@pytest.fixture(scope="module")
def heavy_pair(tmp_path_factory):
    """Laplace(0, 1) with three huge outliers (1e6 values), and uniform(-1, 1)."""
    tmp = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    heavy = rng.laplace(0, 1, (1000, 1000)).astype(np.float32)
    heavy[0, :3] = [150, -180, 200]
    flat = rng.uniform(-1, 1, (1000, 1000)).astype(np.float32)
    return _model(tmp, PAIR), _data(tmp / "pair.npz", heavy=heavy, flat=flat), heavy, flat


def test_minmax_equals_numpy_over_all_samples(tmp_path):
    x = _normal(37)  # not a multiple of the batch of 8
    ranges = calibrate(_model(tmp_path, external_data=True), ["x", "h", "y", "two"], _data(tmp_path / "d.npz", x=x),
                       CalibrationOptions())
    for name, ref in {"x": x, "h": 2 * x, "y": np.maximum(2 * x, 0), "two": np.float32(2)}.items():
        r = ranges[name]
        assert (r.lo, r.hi) == (ref.min(), ref.max()) == (r.observed_min, r.observed_max), name
        assert (r.nonfinite, r.samples) == (0, 37)


def test_means_over_axis_0_equal_numpy_where_asked(tmp_path):
    x = _normal(37)
    ranges = calibrate(_model(tmp_path), ["x", "h", "y", "two"], _data(tmp_path / "d.npz", x=x), CalibrationOptions(),
                       means={"h", "y", "two"})
    np.testing.assert_allclose(ranges["h"].mean, (2 * x).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ranges["y"].mean, np.maximum(2 * x, 0).mean(axis=0), rtol=1e-5, atol=1e-6)
    assert ranges["x"].mean is None  # not asked for
    assert ranges["two"].mean is None  # a scalar has no axis 0


WIDTHS = """
<ir_version: 10, opset_import: ["" : 17]>
widths (float[N, W] x) => (float[N, W] h) {
    two = Constant <value = float {2.0}> ()
    h = Mul(x, two)
}
"""


def test_no_mean_where_the_shape_changes_or_values_are_not_finite(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _data(folder / "a.npz", x=_normal(8, width=16))
    _data(folder / "b.npz", x=_normal(8, width=12))
    assert calibrate(_model(tmp_path, WIDTHS), ["h"], str(folder), CalibrationOptions(), means={"h"})["h"].mean is None
    x = _normal(8)
    x[3, 5] = np.nan
    r = calibrate(_model(tmp_path), ["h"], _data(tmp_path / "nan.npz", x=x), CalibrationOptions(), means={"h"})["h"]
    assert r.mean is None and r.nonfinite == 1


def test_moving_average_equals_numpy_ema(tmp_path):
    x = _normal(37) * np.linspace(0.5, 3, 37, dtype=np.float32)[:, None]  # ranges that drift
    ranges = calibrate(_model(tmp_path), ["h"], _data(tmp_path / "d.npz", x=x), CalibrationOptions(moving_average=0.1))
    h = 2 * x
    lo, hi = h[:8].min(), h[:8].max()
    for start in range(8, 37, 8):  # the batches ORT sees
        lo += 0.1 * (h[start:start + 8].min() - lo)
        hi += 0.1 * (h[start:start + 8].max() - hi)
    r = ranges["h"]
    assert r.lo == pytest.approx(lo, rel=1e-6) and r.hi == pytest.approx(hi, rel=1e-6)
    assert (r.observed_min, r.observed_max) == (h.min(), h.max())
    assert h.min() < r.lo and r.hi < h.max()


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_numpy_within_a_bin(tmp_path, symmetric):
    x = _normal(500, seed=1) + 0.5  # skewed around 0
    options = CalibrationOptions(method=Method.PERCENTILE, percentile=99.0)
    r = calibrate(_model(tmp_path), ["h"], _data(tmp_path / "d.npz", x=x), options, {"h": symmetric})["h"]
    h = 2 * x.astype(np.float64)
    if symmetric:
        width = np.abs(h).max() / options.num_bins
        assert r.hi == pytest.approx(np.percentile(np.abs(h), 99.0), abs=width) and r.lo == -r.hi
    else:
        width = (h.max() - h.min()) / options.num_bins
        assert r.lo == pytest.approx(np.percentile(h, 1.0), abs=width)
        assert r.hi == pytest.approx(np.percentile(h, 99.0), abs=width)


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_clips_heavy_tails_and_keeps_uniform(heavy_pair, symmetric):
    model, data, heavy, flat = heavy_pair
    r = calibrate(model, ["a", "b"], data, CalibrationOptions(method=Method.ENTROPY), {"a": symmetric, "b": symmetric})
    assert r["a"].observed_max == 200 and r["a"].observed_min == -180
    # The KL search starts at 128 of 2048 bins: 200 * 128 / 2048 = 12.5, far below the max, near the bulk.
    assert 5 < r["a"].hi <= 12.5 and -12.5 <= r["a"].lo < -5
    assert r["b"].hi >= 0.98 * flat.max() and r["b"].lo <= 0.98 * flat.min()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clips_heavy_tails_keeps_uniform_and_is_optimal(heavy_pair, symmetric):
    model, data, heavy, flat = heavy_pair
    r = calibrate(model, ["a", "b"], data, CalibrationOptions(method=Method.MSE), {"a": symmetric, "b": symmetric})
    assert r["a"].hi < 0.5 * heavy.max() and r["a"].lo > 0.5 * heavy.min()
    assert r["b"].hi >= 0.98 * flat.max() and r["b"].lo <= 0.98 * flat.min()
    if symmetric:
        assert r["a"].lo == -r["a"].hi

    x = heavy.astype(np.float64)

    def error(lo, hi):  # what the caller's spec will do: int8 symmetric / uint8 with 0 exact
        if symmetric:
            scale = hi / 127
            return np.sum((x - np.clip(np.rint(x / scale), -127, 127) * scale) ** 2)
        scale = (hi - lo) / 255
        zero = np.rint(-lo / scale)
        return np.sum((x - (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale) ** 2)

    chosen = error(r["a"].lo, r["a"].hi)
    assert chosen < 0.5 * error(heavy.min(), heavy.max())
    for factor in (0.7, 0.9, 1.1, 1.4):  # no nearby clipping range does better (beyond grid effects)
        assert chosen <= 1.01 * error(r["a"].lo * factor, r["a"].hi * factor)


def test_expected_squared_error_equals_brute_force():
    rng = np.random.default_rng(3)
    edges = np.linspace(-1.5, 4.0, 65)
    counts = rng.integers(0, 50, 64)
    lo, hi = np.array([edges[0], edges[10], edges[20]]), np.array([edges[64], edges[50], edges[30]])
    got = expected_squared_error(counts, edges, lo, hi, steps=15)
    for k in range(3):
        l, h = min(lo[k], 0.0), max(hi[k], 0.0)
        scale = (h - l) / 15
        # Each bin's mass spread uniformly: 2,000 midpoints per bin.
        u = (np.arange(2000) + 0.5) / 2000
        x = edges[:-1, None] + u * np.diff(edges)[:, None]
        q = l + np.rint((np.clip(x, l, h) - l) / scale) * scale
        assert got[k] == pytest.approx(np.sum(counts[:, None] * np.mean((x - q) ** 2, axis=1, keepdims=True)), rel=1e-5)


def test_kl_keeps_all_of_a_uniform_histogram_and_clips_a_spike_with_tail():
    assert kl_threshold_bins(np.full(2048, 100)) == 2048
    spike = np.zeros(2048, np.int64)
    spike[:64] = 10_000
    spike[2000] = 1  # one far outlier
    assert kl_threshold_bins(spike) == 128  # the smallest candidate


def test_nonfinite_values_are_counted_and_excluded(tmp_path):
    x = _normal(20)
    x[3, 5], x[7, 0], x[7, 1], x[19, 15] = np.nan, np.inf, -np.inf, np.nan
    data = _data(tmp_path / "d.npz", x=x)
    finite = x[np.isfinite(x)]
    for method in Method:
        r = calibrate(_model(tmp_path), ["x", "h"], data, CalibrationOptions(method=method))
        for name, ref in {"x": finite, "h": 2 * finite}.items():
            assert r[name].nonfinite == 4 and r[name].samples == 20
            assert (r[name].observed_min, r[name].observed_max) == (ref.min(), ref.max())
            assert ref.min() <= r[name].lo < r[name].hi <= ref.max(), (method, name)


CONSTANTS = """
<ir_version: 10, opset_import: ["" : 17]>
constants (float[N, 4] x) => (float[N, 4] y) {
    zero = Constant <value = float {0.0}> ()
    three = Constant <value = float {3.0}> ()
    z = Mul(x, zero)
    c = Add(z, three)
    n = Div(z, z)
    y = Add(c, n)
}
"""


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_zero_and_all_nan_tensors_give_finite_ranges(tmp_path, method, symmetric):
    data = _data(tmp_path / "d.npz", x=_normal(9, width=4))
    r = calibrate(_model(tmp_path, CONSTANTS), ["z", "c", "n"], data, CalibrationOptions(method=method),
                  dict.fromkeys("zcn", symmetric))
    assert (r["z"].lo, r["z"].hi) == (0, 0)
    assert (r["n"].lo, r["n"].hi, r["n"].nonfinite) == (0, 0, 36)  # 0 / 0 everywhere
    lo = -3 if symmetric and method != Method.MINMAX else 3
    assert (r["c"].lo, r["c"].hi, r["c"].observed_min, r["c"].observed_max) == (lo, 3, 3, 3)


@pytest.mark.parametrize("method", [Method.MINMAX, Method.PERCENTILE, Method.MSE])
def test_a_folder_of_npz_files_streams_like_one_file(tmp_path, method):
    x = _normal(45, seed=2)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, (start, stop) in enumerate([(0, 10), (10, 17), (17, 45)]):  # batches split at file ends
        _data(folder / f"part{i}.npz", x=x[start:stop])
    model = _model(tmp_path)
    options = CalibrationOptions(method=method, percentile=99.0)
    whole = calibrate(model, ["h", "y"], _data(tmp_path / "all.npz", x=x), options)
    assert calibrate(model, ["h", "y"], str(folder), options) == whole
    assert whole["h"].samples == 45


def test_limit_caps_the_samples(tmp_path):
    x = _normal(40)
    r = calibrate(_model(tmp_path), ["h"], _data(tmp_path / "d.npz", x=x), CalibrationOptions(), limit=11)["h"]
    assert r.samples == 11 and (r.lo, r.hi) == (2 * x[:11].min(), 2 * x[:11].max())


def test_unknown_or_non_float_tensor_is_a_usage_error(tmp_path):
    model, data = _model(tmp_path), _data(tmp_path / "d.npz", x=_normal(4))
    shape_model = _model(tmp_path, """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 16] x) => (int64[2] s) { s = Shape(x) }
    """, name="shape.onnx")
    with pytest.raises(UsageError, match="'s' is INT64"):
        calibrate(shape_model, ["s"], data, CalibrationOptions())
    with pytest.raises(UsageError, match="input 'x'"):  # bad data: data.py names the input
        calibrate(model, ["h"], _data(tmp_path / "bad.npz", x=_normal(4, width=3)), CalibrationOptions())


def test_bad_options_are_usage_errors():
    assert CalibrationOptions(method="entropy").method is Method.ENTROPY
    for bad in ({"method": "kl"}, {"percentile": 0}, {"num_bins": 1}, {"moving_average": 2.0}):
        with pytest.raises(UsageError):
            CalibrationOptions(**bad)


def _size(value) -> int:
    """Bytes held by arrays (8 per scalar), through containers."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple, set)):
        return 8 + sum(_size(v) for v in value)
    return 8


def test_memory_does_not_grow_with_samples(tmp_path, monkeypatch):
    """Statistics have a fixed size, and no batch outlives the next one."""
    stats, alive, most_alive = [], [], [0]
    for cls in (RangeStatistic, HistogramStatistic):
        original = cls.update
        monkeypatch.setattr(cls, "update", lambda self, *a, _o=original: (stats.append(self), _o(self, *a))[1])
    original_run = runner.run

    def run(*args):
        most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in alive))
        outputs = original_run(*args)
        alive.extend(weakref.ref(o) for o in outputs)
        return outputs

    monkeypatch.setattr(runner, "run", run)

    def footprint(samples: int) -> int:
        stats.clear()
        calibrate(_model(tmp_path), ["h", "y"], _data(tmp_path / f"{samples}.npz", x=_normal(samples)),
                  CalibrationOptions(method=Method.PERCENTILE, num_bins=256))
        objects = {id(s): s for s in stats}.values()
        assert len(objects) == 4  # pass 1 and pass 2 statistics of two tensors
        return sum(_size(v) for s in objects for v in vars(s).values())

    assert footprint(8) == footprint(400) <= 4 * 256 * 8 + 4 * 64
    assert most_alive[0] == 0  # no batch's outputs are alive while the next batch runs


def test_progress_counts_samples_per_pass(tmp_path, monkeypatch):
    seen = {}

    class Task:
        def __init__(self, description, total):
            seen[description] = [total, 0]
            self.description = description

        def __enter__(self):
            return lambda steps=1: seen[self.description].__setitem__(1, seen[self.description][1] + steps)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runner.progress, "task", Task)
    calibrate(_model(tmp_path), ["h"], _data(tmp_path / "d.npz", x=_normal(21)),
              CalibrationOptions(method=Method.ENTROPY))
    assert seen == {"calibrating (pass 1/2)": [21, 21], "calibrating (pass 2/2)": [21, 21]}


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_is_not_fooled_by_the_zeros_of_a_relu(tmp_path, symmetric):
    x = _normal(2000, seed=4)  # y = Relu(2x): half exact zeros, half a half-normal of scale 2
    r = calibrate(_model(tmp_path), ["y"], _data(tmp_path / "d.npz", x=x), CalibrationOptions(method=Method.ENTROPY),
                  {"y": symmetric})["y"]
    assert 0.7 * r.observed_max < r.hi <= r.observed_max and r.observed_max > 7
    assert r.lo == (-r.hi if symmetric else 0)


def test_per_channel_statistics_and_gram_match_numpy_over_all_batches(tmp_path):
    """The runner's pluggable statistics on h = 2x, fed 8 samples at a time: what numpy gives on all 21."""
    from qcompile.calibration import ChannelMax, ChannelMeanAbs, ChannelMeanSquare, Gram, MeanStatistic

    x = _normal(21, seed=3)
    model = load_model(_model(tmp_path))
    outputs = list(model.graph.outputs)
    h = next(node.outputs[0] for node in model.graph if node.op_type == "Mul")
    stats = [ChannelMax(-1, absolute=True), ChannelMax(1), ChannelMeanSquare(-1), Gram(), MeanStatistic(1),
             ChannelMeanAbs(-1)]
    CalibrationRunner(model, CalibrationData(_data(tmp_path / "d.npz", x=x))).run({h: stats}, "statistics")
    assert list(model.graph.outputs) == outputs  # the outputs added for the run are taken off again
    h_all = (2 * x).astype(np.float64)
    np.testing.assert_allclose(stats[0].value, np.abs(h_all).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats[1].value, h_all.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats[2].value, (h_all**2).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats[5].value, np.abs(h_all).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats[3].total, h_all.T @ h_all, rtol=1e-6)
    assert stats[3].rows == 21 and stats[3].memory_bytes() == 16 * 16 * 8
    # Mean over axis 1 of batches of shape (8, 16): one shape per batch only if the batches agree; the
    # last batch holds 5 samples, so the sample axis changes shape and there is no mean.
    assert stats[4].result() is None


# x -> h = x @ w; w an initializer a run may replace.
LINEAR = """
<ir_version: 10, opset_import: ["" : 17]>
linear (float[N, 16] x) => (float[N, 4] h) <float[16, 4] w = {%s}> {
    h = MatMul(x, w)
}
""" % ", ".join(["1.0"] * 64)


def test_a_replaceable_initializer_takes_the_values_a_run_feeds_and_its_own_otherwise(tmp_path):
    from qcompile.calibration import ChannelMax

    x = _normal(9, seed=5)
    model = load_model(_model(tmp_path, LINEAR))
    w, h = model.graph.initializers["w"], list(model.graph)[0].outputs[0]
    runner = CalibrationRunner(model, CalibrationData(_data(tmp_path / "d.npz", x=x)), replaceable=[w])
    replaced = np.arange(64, dtype=np.float32).reshape(16, 4) / 64
    maxima = [ChannelMax(-1), ChannelMax(-1)]
    runner.run({h: [maxima[0]]}, "replaced", replacements={w: replaced})
    runner.run({h: [maxima[1]]}, "own")
    np.testing.assert_allclose(maxima[0].value, (x @ replaced).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(maxima[1].value, (x @ np.ones((16, 4))).max(axis=0), rtol=1e-5)
    assert list(model.graph.inputs) == [model.graph.inputs[0]] and model.graph.inputs[0].name == "x"
    with pytest.raises(ValueError, match="not replaceable"):
        runner.run({h: [ChannelMax(-1)]}, "bad", replacements={h: replaced})


def test_data_without_samples_is_a_usage_error_not_empty_statistics(tmp_path):
    model = load_model(_model(tmp_path))
    h = next(node.outputs[0] for node in model.graph if node.op_type == "Mul")
    runner = CalibrationRunner(model, CalibrationData(_data(tmp_path / "empty.npz", x=np.zeros((0, 16), np.float32))))
    with pytest.raises(UsageError, match="holds no samples"):
        runner.run({h: [RangeStatistic("h")]}, "calibrating")
