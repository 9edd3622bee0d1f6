"""OutlierSplitMatMul (LLM.int8()): the C++ kernels (every instruction-set path this CPU has) against the numpy
reference, its standard-ONNX equivalent, and clean errors on bad input."""
import numpy as np
import onnxruntime as ort
import pytest

from qcompile import kernels
from qcompile.ops import outlier_split_matmul as op

RNG = np.random.default_rng(5)


def _session(model, library):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _activations(batch: int, rows: int, k: int) -> np.ndarray:
    """Mostly below 3 in magnitude, with a few columns reaching 20-60 (as LLM activations' outlier features)."""
    a = RNG.standard_normal((batch, rows, k)).astype(np.float32)
    a[..., RNG.choice(k, size=max(k // 50, 1), replace=False)] *= RNG.uniform(20, 60)
    return a


# (K, N, batch, rows, threshold, fixed columns): odd sizes, one row and many, thresholds that select no column,
# some and all, and columns fixed at calibration
CASES = [(100, 13, 1, 1, 6.0, None), (576, 37, 2, 5, 6.0, None), (1536, 9, 1, 130, 6.0, None),
         (300, 21, 2, 3, 1e9, None), (64, 8, 1, 4, 1e-6, None), (200, 11, 1, 3, 6.0, [0, 17, 199]),
         (33, 5, 3, 2, 6.0, [])]


@pytest.mark.parametrize("k, n, batch, rows, threshold, columns", CASES)
def test_every_kernel_path_computes_the_reference(kernels_library, monkeypatch, k, n, batch, rows, threshold,
                                                 columns):
    b, scales = op.random_weight(RNG, K=k, N=n)
    model = op.make_model(b, scales, columns, K=k, N=n, threshold=threshold)
    a = _activations(batch, rows, k)
    expected = op.reference(a, b, scales, columns, K=k, N=n, threshold=threshold)
    for isa in kernels.cpu_isas():
        monkeypatch.setenv(kernels.ISA_ENV, isa)
        got = _session(model, kernels_library).run(None, {"A": a})[0]
        assert got.shape == (batch, rows, n)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("rows, columns", [(1, None), (6, None), (3, [2, 50])])
def test_float16_activations_give_the_float32_output_rounded_once(kernels_library, monkeypatch, rows, columns):
    b, scales = op.random_weight(RNG, K=200, N=37)
    a = _activations(2, rows, 200).astype(np.float16)
    float32 = op.make_model(b, scales, columns, K=200, N=37)
    float16 = op.make_model(b, scales, columns, K=200, N=37, dtype=np.float16)
    assert op.reference(a, b, scales, columns, K=200, N=37).dtype == np.float16
    for isa in kernels.cpu_isas():
        monkeypatch.setenv(kernels.ISA_ENV, isa)
        got = _session(float16, kernels_library).run(None, {"A": a})[0]
        rounded = _session(float32, kernels_library).run(None, {"A": a.astype(np.float32)})[0].astype(np.float16)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, rounded)


def test_float16_conversions_round_as_numpy_does(kernels_library, monkeypatch):
    """Every column an outlier and the weight diagonal, so Y = A * scales exactly in float32: the conversions alone,
    over every finite float16 magnitude and products that become subnormal, tie, or pass 65504."""
    k = 2048
    b = np.full((k, k), 128, np.uint8)
    np.fill_diagonal(b, 129)
    scales = np.exp2(RNG.uniform(-12, 4, k)).astype(np.float32)
    scales[:4] = [1.0, 0.5, 2.0 ** -10, 4096.0]  # exact values, halves (ties), deep subnormals, overflow
    bits = RNG.integers(0, 0x7C00, (3, k), dtype=np.uint16) | (RNG.integers(0, 2, (3, k), dtype=np.uint16) << 15)
    a = bits.view(np.float16)[None]
    model = op.make_model(b, scales, np.arange(k), K=k, N=k, dtype=np.float16)
    with np.errstate(over="ignore"):  # past 65504: infinity, as the kernels give
        expected = (a.astype(np.float32) * scales).astype(np.float16)
    assert np.isinf(expected).any() and (np.abs(expected) < np.float16(2 ** -14)).any()
    for isa in kernels.cpu_isas():
        monkeypatch.setenv(kernels.ISA_ENV, isa)
        got = _session(model, kernels_library).run(None, {"A": a})[0]
        np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_outlier_columns_in_float_make_the_product_more_accurate():
    b, scales = op.random_weight(RNG, K=512, N=64)
    a = _activations(1, 8, 512)[0]
    exact = a @ ((b.astype(np.float32) - 128) * scales[:, None]).T
    split = op.reference(a, b, scales, K=512, N=64)
    plain = op.reference(a, b, scales, K=512, N=64, threshold=np.inf)
    assert len(op.outlier_columns(a, 6.0)) == 10
    error = {name: np.abs(y - exact).max() / np.abs(exact).max() for name, y in (("split", split), ("plain", plain))}
    assert error["split"] < error["plain"] / 5 and error["split"] < 0.01
    every = op.reference(a, b, scales, K=512, N=64, threshold=1e-9)  # every column in float: the float product
    np.testing.assert_allclose(every, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("columns", [None, [1, 40, 99]])
def test_the_standard_onnx_equivalent_computes_the_same(kernels_library, columns):
    b, scales = op.random_weight(RNG, K=100, N=29)
    a = _activations(2, 3, 100)
    custom = _session(op.make_model(b, scales, columns, K=100, N=29), kernels_library).run(None, {"A": a})[0]
    decomposed = ort.InferenceSession(op.decomposed_model(b, scales, columns, K=100, N=29).SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_allclose(decomposed, custom, rtol=0, atol=1e-5 * np.abs(custom).max())


def test_non_finite_rows_and_bad_input(kernels_library):
    b, scales = op.random_weight(RNG, K=64, N=4)
    a = RNG.standard_normal((1, 3, 64)).astype(np.float32)
    a[0, 1, 3] = np.nan
    y = _session(op.make_model(b, scales, K=64, N=4), kernels_library).run(None, {"A": a})[0]
    assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, [0, 2]]).all()
    with pytest.raises(Exception, match=r"outlier_columns must lie in \[0, K = 64\)"):
        _session(op.make_model(b, scales, [3, 64], K=64, N=4), kernels_library).run(None, {"A": a})
    with pytest.raises(Exception, match="threshold must be positive"):
        _session(op.make_model(b, scales, K=64, N=4, threshold=0.0), kernels_library)
    with pytest.raises(Exception, match="scales has 3 elements, expected 4"):
        _session(op.make_model(b, scales[:3], K=64, N=4), kernels_library).run(None, {"A": a})
    with pytest.raises(Exception, match="K must be at most 66311, got 70000"):  # its int32 sums would overflow
        _session(op.make_model(b, scales, K=70000, N=4), kernels_library)
