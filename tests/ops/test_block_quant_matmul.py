"""BlockQuantMatMul: the C++ kernels (every instruction-set path this CPU has) against the numpy reference, its
standard-ONNX equivalent, and clean errors on bad input."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile import kernels
from qcompile.ops import block_quant_matmul as op

RNG = np.random.default_rng(11)


def _session(model, library, isa: str | None = None, monkeypatch=None):
    if isa is not None:
        monkeypatch.setenv(kernels.ISA_ENV, isa)  # the library reads it when a session creates its kernels
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _case(k, n, bits, block_size, symmetric):
    attributes = dict(K=k, N=n, bits=bits, block_size=block_size)
    return attributes, op.random_weight(RNG, symmetric=symmetric, **attributes)


# (K, N, bits, block, symmetric, batch, rows): odd K and N, short last blocks, an odd count of 32-blocks, one row
# (the streamed path) and several (the GEMM path, with a leftover row and leftover columns), 8-bit heads
CASES = [(100, 13, 4, 32, True, 1, 1), (100, 13, 4, 32, False, 2, 3), (576, 37, 4, 128, False, 1, 5),
         (1000, 19, 4, 64, True, 3, 2), (520, 11, 4, 256, False, 2, 7), (96, 9, 8, 32, True, 1, 1),
         (300, 21, 8, 64, False, 2, 4), (4096, 8, 4, 32, True, 1, 1), (64, 1, 4, 64, False, 1, 9)]


@pytest.mark.parametrize("k, n, bits, block_size, symmetric, batch, rows", CASES)
def test_every_kernel_path_computes_the_reference(kernels_library, monkeypatch, k, n, bits, block_size, symmetric,
                                                 batch, rows):
    attributes, weight = _case(k, n, bits, block_size, symmetric)
    model = op.make_model(*weight, **attributes)
    a = RNG.standard_normal((batch, rows, k)).astype(np.float32) * RNG.uniform(0.1, 10, k).astype(np.float32)
    expected = op.reference(a, *weight, **attributes)
    outputs = {}
    for isa in kernels.cpu_isas():
        outputs[isa] = _session(model, kernels_library, isa, monkeypatch).run(None, {"A": a})[0]
        assert outputs[isa].shape == (batch, rows, n)
        np.testing.assert_allclose(outputs[isa], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    if {"avx2", "avx512vnni"} <= outputs.keys() and batch * rows < 3:
        # one row at a time: the same integers, the same float operations in the same order (the GEMM path adds
        # its lanes in another order with 512-bit registers)
        np.testing.assert_array_equal(outputs["avx2"], outputs["avx512vnni"])


# (K, N, block, code book, scale_block, batch, rows): a code book (NF4's form) and 8-bit scales, together and
# apart, with a scale_block that splits the kernels' 16-column tasks, on the one-row and the GEMM path
WEIGHT_FORMS = [(256, 37, 64, True, None, 1, 1), (200, 40, 32, True, 5, 1, 1), (576, 37, 64, True, 256, 2, 3),
                (130, 21, 32, False, 7, 1, 4), (4096, 17, 128, True, 3, 1, 1)]


@pytest.mark.parametrize("k, n, block_size, code_book, scale_block, batch, rows", WEIGHT_FORMS)
def test_code_books_and_eight_bit_scales_compute_the_reference(kernels_library, monkeypatch, k, n, block_size,
                                                               code_book, scale_block, batch, rows):
    attributes = dict(K=k, N=n, bits=4, block_size=block_size)
    weight = op.random_weight(RNG, symmetric=code_book, code_book=code_book, scale_block=scale_block, **attributes)
    model = op.make_model(*weight, **attributes)
    a = RNG.standard_normal((batch, rows, k)).astype(np.float32)
    expected = op.reference(a, *weight, **attributes)
    for isa in kernels.cpu_isas():
        y = _session(model, kernels_library, isa, monkeypatch).run(None, {"A": a})[0]
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    decomposed = ort.InferenceSession(op.decomposed_model(*weight, **attributes).SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_allclose(decomposed, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("rows", [1, 10])
def test_activations_at_exact_ties_round_as_the_reference(kernels_library, monkeypatch, rows):
    """Activations with few mantissa bits (float16 values) often give x * 127 / max|x| exactly half-way: the kernels
    must round that float32 product, not a fused multiply-add's exact one."""
    attributes, weight = _case(256, 37, 4, 32, True)
    a = RNG.standard_normal((1, rows, 256)).astype(np.float16).astype(np.float32)
    expected = op.reference(a, *weight, **attributes)
    for isa in kernels.cpu_isas():
        y = _session(op.make_model(*weight, **attributes), kernels_library, isa, monkeypatch).run(None, {"A": a})[0]
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("rows, code_book", [(1, False), (5, True)])
def test_float16_activations_give_the_float32_output_rounded_once(kernels_library, monkeypatch, rows, code_book):
    attributes = dict(K=200, N=37, bits=4, block_size=32)
    weight = op.random_weight(RNG, symmetric=True, code_book=code_book, scale_block=8 if code_book else None,
                              **attributes)
    a = RNG.standard_normal((2, rows, 200)).astype(np.float16)
    expected = op.reference(a, *weight, **attributes)
    assert expected.dtype == np.float16
    float16, float32 = op.make_model(*weight, **attributes, dtype=np.float16), op.make_model(*weight, **attributes)
    for isa in kernels.cpu_isas():
        got = _session(float16, kernels_library, isa, monkeypatch).run(None, {"A": a})[0]
        rounded = _session(float32, kernels_library, isa, monkeypatch).run(None, {"A": a.astype(np.float32)})[0]
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, rounded.astype(np.float16))
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=2 ** -10,
                                   atol=1e-5 * np.abs(expected.astype(np.float32)).max())


def test_a_code_book_indexes_its_levels():
    attributes = dict(K=64, N=3, bits=4, block_size=64)
    b, scales, _, book = op.random_weight(RNG, symmetric=True, code_book=True, **attributes)
    levels, points = op.unpack_weight(b, None, 3, 1, 4, 64, book)
    first = int(b.reshape(3, 32)[1, 0]) & 0x0F  # column 1's first index, in the low nibble
    assert levels[1, 0, 0] - points[1, 0] == book[first]
    a = np.zeros((1, 64), np.float32)
    a[0, 0] = 1.0  # picks that one weight: scale x code_book[index]
    y = op.reference(a, b, scales, None, book, **attributes)
    assert y[0, 1] == pytest.approx(scales[1] * book[first], rel=1e-6)


def test_eight_bit_scales_decode_per_group_of_columns():
    scales = op.EightBitScales(np.array([10, 20, 30, 40, 50, 60], np.uint8), np.array([0.5, 0.25, 1.0], np.float32),
                               np.array([2, 4, 0], np.uint8), block=2)  # N = 6, one block along K
    np.testing.assert_array_equal(scales.decode(6, 1), [4.0, 9.0, 6.5, 9.0, 50.0, 60.0])


def test_the_reference_is_the_float_product_up_to_the_activations_rounding():
    attributes, weight = _case(576, 40, 4, 32, False)
    a = RNG.standard_normal((4, 576)).astype(np.float32)
    levels, points = op.unpack_weight(weight[0], weight[2], 40, 18, 4, 32)
    dequantized = (weight[1].reshape(40, 18, 1) * (levels - points[..., None])).reshape(40, -1)
    exact = a @ dequantized.T
    error = np.abs(op.reference(a, *weight, **attributes) - exact).max() / np.abs(exact).max()
    assert 1e-5 < error < 0.02  # int8 activations per block of 32: about 0.3% of the largest output here


def test_the_standard_onnx_equivalent_computes_the_same(kernels_library):
    attributes, weight = _case(300, 29, 4, 64, False)
    a = RNG.standard_normal((2, 3, 300)).astype(np.float32)
    custom = _session(op.make_model(*weight, **attributes), kernels_library).run(None, {"A": a})[0]
    decomposed = ort.InferenceSession(op.decomposed_model(*weight, **attributes).SerializeToString(),
                                      providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_allclose(decomposed, custom, rtol=0, atol=1e-5 * np.abs(custom).max())


def test_zero_and_non_finite_activations(kernels_library):
    attributes, weight = _case(128, 16, 4, 32, True)
    session = _session(op.make_model(*weight, **attributes), kernels_library)
    a = RNG.standard_normal((1, 4, 128)).astype(np.float32)
    a[0, 0] = 0
    a[0, 1, 40] = np.nan
    a[0, 2, 100] = np.inf
    y = session.run(None, {"A": a})[0]
    assert not y[0, 0].any()  # zeros give zeros, not 0 / 0
    assert np.isnan(y[0, 1]).all() and np.isnan(y[0, 2]).all()  # as a float product would be
    np.testing.assert_allclose(y[0, 3], op.reference(a[:, 3:], *weight, **attributes)[0, 0], rtol=1e-5)


def test_bad_shapes_and_types_are_clean_errors(kernels_library):
    attributes, weight = _case(100, 8, 4, 32, True)
    model = op.make_model(*weight, **attributes)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "k"  # the kernel checks K, not the graph
    session = _session(model, kernels_library)
    with pytest.raises(Exception, match=r"A has shape \(1, 2, 99\), its last dimension must be K = 100"):
        session.run(None, {"A": np.ones((1, 2, 99), np.float32)})
    short = op.make_model(weight[0][:, :2], weight[1], None, **attributes)
    with pytest.raises(Exception, match="B has 256 elements, expected 512"):
        _session(short, kernels_library).run(None, {"A": np.ones((1, 1, 100), np.float32)})
    for name, value in (("bits", 3), ("block_size", 48)):
        bad = op.make_model(*weight, **{**attributes, name: value})
        with pytest.raises(Exception, match=f"{name} must be"):
            _session(bad, kernels_library)
    float_points = op.make_model(weight[0], weight[1], np.full(8 * 2, 8, np.float32), **attributes)
    with pytest.raises(Exception, match=r"zero_points.*BlockQuantMatMul.*invalid"):  # ONNX Runtime checks types
        _session(float_points, kernels_library)


def test_bad_code_books_and_scales_are_clean_errors(kernels_library):
    attributes = dict(K=64, N=8, bits=4, block_size=32)
    b, scales, _, book = op.random_weight(RNG, symmetric=True, code_book=True, scale_block=4, **attributes)
    floats = np.ones(16, np.float32)
    a = {"A": np.ones((1, 1, 64), np.float32)}
    cases = [(op.make_model(b, floats, None, book[:8], **attributes), "code_book has 8 elements, expected 16"),
             (op.make_model(b, floats, np.full(8, 0x88, np.uint8), book, **attributes), "takes no zero_points"),
             (op.make_model(b, scales, None, book, **attributes), None)]
    both = op.make_model(b, scales, None, book, **attributes)
    both.graph.initializer.append(onnx.numpy_helper.from_array(floats, "floats"))
    both.graph.node[0].input[2] = "floats"  # float scales as well as 8-bit ones
    cases.append((both, "either scales or scale_levels"))
    stray = op.make_model(b, floats, None, book, **attributes)
    stray.graph.initializer.append(onnx.numpy_helper.from_array(scales.scales, "stray"))
    stray.graph.node[0].input.extend(["", "stray"])  # scale_scales without scale_levels
    cases.append((stray, "either scales or scale_levels"))
    no_block = op.make_model(b, scales, None, book, **attributes)
    del no_block.graph.node[0].attribute[-1]
    assert no_block.graph.node[0].attribute[-1].name != "scale_block"
    cases.append((no_block, "attribute scale_block"))
    for model, message in cases:
        session = _session(model, kernels_library)
        if message is None:
            session.run(None, a)  # the well-formed one runs
            continue
        with pytest.raises(Exception, match=message):
            session.run(None, a)
