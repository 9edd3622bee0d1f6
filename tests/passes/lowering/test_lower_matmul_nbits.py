"""4-bit block-wise weights: the specs `assign-block-specs` decides (and HQQ refits), and MatMulNBits as ONNX Runtime
reads it."""
import numpy as np
import onnx_ir as ir
import pytest
from helpers import NBITS_8, apply, clone, op_types, parse, run

from qcompile.decisions import QUANT_SPEC_KEY
from qcompile.ops import block_quant_matmul
from qcompile.passes.analysis.assign_block_specs import AssignBlockSpecsPass, BlockSpecOptions, block_spec
from qcompile.passes.analysis.fit_block_grids_hqq import FitBlockGridsHQQPass, HQQOptions, hqq_spec
from qcompile.passes.lowering.lower_matmul_nbits import (LowerMatMulNBitsPass, MatMulNBitsOptions, pack_nibbles,
                                                         pack_weight)
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass

RNG = np.random.default_rng(7)


def _model(k: int, n: int, text_body: str, inputs: str = "float[B, S, {k}] x", outputs: str = "float[B, S, {n}] y",
           weights: dict[str, np.ndarray] | None = None, opset: int = 17) -> ir.Model:
    """A graph over ``weights`` (initializers, declared in the text with zeros and then filled)."""
    weights = weights or {}
    declared = ", ".join(f"float[{', '.join(map(str, a.shape))}] {name} = {{{', '.join(['0'] * a.size)}}}"
                         for name, a in weights.items())
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g ({inputs.format(k=k, n=n)}) => ({outputs.format(k=k, n=n)}) <{declared}> {{
        {text_body}
    }}""")
    for name, array in weights.items():
        model.graph.initializers[name].const_value = ir.tensor(array, name=name)
    return model


def _unpack(data: np.ndarray) -> np.ndarray:
    """Bytes -> 4-bit levels, low nibble first (written apart from `pack_nibbles`)."""
    levels = np.empty(data.shape[:-1] + (data.shape[-1] * 2,), np.uint8)
    levels[..., 0::2] = data & 0x0F
    levels[..., 1::2] = data >> 4
    return levels


def _weight(k: int, n: int) -> np.ndarray:
    # columns of very different magnitudes, and an outlier: blocks and their scales must line up
    w = RNG.standard_normal((k, n)) * np.linspace(0.01, 2.0, n)
    w[3, 1] = 9.0
    return w.astype(np.float32)


def test_nibbles_pack_low_first():
    assert pack_nibbles(np.array([1, 2, 15, 0], np.uint8)).tolist() == [0x21, 0x0F]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 70])  # whole blocks, and a short last block
def test_packed_weight_is_the_specs_levels_bit_for_bit(symmetric, k, bits):
    w = _weight(k, 5)
    spec = block_spec(w, 0, 32, symmetric, bits=bits)
    packed = pack_weight(w, spec)
    k_blocks = -(-k // 32)
    assert packed.data.shape == (5, k_blocks, 32 * bits // 8) and packed.scales.shape == (5 * k_blocks,)
    unpack = _unpack if bits == 4 else (lambda data: data)
    levels = unpack(packed.data).reshape(5, -1)[:, :k].astype(np.int16)
    expected = spec.quantize(w).astype(np.int16).T
    zero_points = spec.zero_point.astype(np.int16).T  # (N, k_blocks)
    if symmetric:
        assert packed.zero_points is None
        np.testing.assert_array_equal(levels - 2 ** (bits - 1), expected)
    else:
        unpacked = unpack(packed.zero_points.reshape(5, -1))[:, :k_blocks]
        np.testing.assert_array_equal(unpacked, zero_points)
        np.testing.assert_array_equal(levels, expected)
    np.testing.assert_array_equal(packed.scales.reshape(5, k_blocks), spec.stored_scale().T)


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_spec_rounds_each_block_to_nearest_on_its_own_range(symmetric):
    w = _weight(96, 4)
    spec = block_spec(w, 0, 32, symmetric)
    assert spec.scale.shape == (3, 4)
    error = np.abs(spec.dequantize(spec.quantize(w)) - w)
    step = np.abs(np.repeat(spec.scale, 32, axis=0))
    # within half a step of its block; symmetric, a value of the other sign than the extreme, past 7
    # levels, is clipped to 7: within a step
    assert np.all(error <= (step if symmetric else step / 2) + 1e-6)
    if symmetric:  # the value of largest magnitude of each block lands on -8 exactly
        blocks = w.reshape(3, 32, 4)
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)[:, 0]
        np.testing.assert_allclose(extreme / spec.scale, -8, rtol=1e-6)
    positive = block_spec(w, 0, 32, symmetric, negative_scales=False)
    assert np.all(positive.scale > 0)


MATMULS = """
    y = MatMul(x, w)
    z = MatMul(x, w)
"""


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 72])
def test_matmuls_run_as_matmulnbits_equal_to_the_dequantized_weight(symmetric, k):
    """Two MatMuls share one weight (packed once); ORT's result equals numpy's on the dequantized weight."""
    w = _weight(k, 6)
    model = _model(k, 6, MATMULS, outputs="float[B, S, {n}] y, float[B, S, {n}] z", weights={"w": w})
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    apply(model, AssignBlockSpecsPass(BlockSpecOptions(block_size=32, symmetric=symmetric)))
    spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
    dequantized = spec.dequantize(spec.quantize(w))
    assert apply(model, LowerMatMulNBitsPass(MatMulNBitsOptions(accuracy_level=0)))
    assert op_types(model) == ["MatMulNBits", "MatMulNBits"] and "w" not in model.graph.initializers
    assert len(model.graph.initializers) == (2 if symmetric else 3)  # one packed copy for both
    y, z = run(model, {"x": x})
    np.testing.assert_allclose(y, x @ dequantized, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y, z)
    assert not apply(model, LowerMatMulNBitsPass())


@pytest.mark.parametrize("symmetric", [True, False])
def test_custom_lowering_gives_qcompiles_op_the_same_packed_inputs(kernels_library, symmetric):
    w = _weight(72, 6)
    model = _model(72, 6, MATMULS, outputs="float[B, S, {n}] y, float[B, S, {n}] z", weights={"w": w})
    x = RNG.standard_normal((2, 3, 72)).astype(np.float32)
    nbits = clone(model)
    for m, custom in ((model, True), (nbits, False)):
        apply(m, AssignBlockSpecsPass(BlockSpecOptions(block_size=32, symmetric=symmetric)))
        packed = pack_weight(w, m.graph.initializers["w"].meta[QUANT_SPEC_KEY])
        assert apply(m, LowerMatMulNBitsPass(MatMulNBitsOptions(accuracy_level=4, custom=custom)))
    assert op_types(model) == ["BlockQuantMatMul"] * 2 and model.opset_imports["ai.qcompile"] == 1
    assert model.metadata_props["qcompile.custom_ops"] == "ai.qcompile: BlockQuantMatMul"
    stored = [v.const_value.numpy() for v in list(model.graph)[0].inputs[1:]]
    for array, expected in zip(stored, [packed.data, packed.scales, packed.zero_points], strict=False):
        np.testing.assert_array_equal(array, expected)  # MatMulNBits' packing, one copy for both layers
    assert len(model.graph.initializers) == len(stored)
    y, z = run(model, {"x": x})
    expected = block_quant_matmul.reference(x, packed.data, packed.scales, packed.zero_points, K=72, N=6, bits=4,
                                            block_size=32)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, z)
    # MatMulNBits at accuracy_level 4 quantizes the activations too, with roundings of its own
    np.testing.assert_allclose(y, run(nbits, {"x": x})[0], rtol=0.02, atol=0.02)


@NBITS_8
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_layer_writing_a_model_output_gets_8_bit_blocks_where_asked(symmetric):
    w = _weight(72, 6)
    model = _model(72, 6, "y = MatMul(x, w)", weights={"w": w})
    x = RNG.standard_normal((2, 3, 72)).astype(np.float32)
    apply(model, AssignBlockSpecsPass(BlockSpecOptions(block_size=32, symmetric=symmetric, head_bits=8)))
    spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
    assert spec.grid.bits == 8 and "1 layer(s) writing a model output (an LM head) in blocks of 8 bits" in \
        model.meta["qcompile.notes"]
    apply(model, LowerMatMulNBitsPass(MatMulNBitsOptions(accuracy_level=0)))
    assert next(iter(model.graph)).attributes.get_int("bits") == 8
    np.testing.assert_allclose(run(model, {"x": x})[0], x @ spec.dequantize(spec.quantize(w)), rtol=1e-4, atol=1e-4)


def test_gemm_with_transposed_weight_and_bias():
    w = _weight(64, 5)
    bias = RNG.standard_normal(5).astype(np.float32)
    model = _model(64, 5, "y = Gemm <transB = 1> (x, w, b)", inputs="float[B, {k}] x", outputs="float[B, {n}] y",
                   weights={"w": np.ascontiguousarray(w.T), "b": bias})
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    apply(model, AssignBlockSpecsPass(BlockSpecOptions(block_size=16, symmetric=False)))
    spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
    assert spec.granularity.axis == 1 and spec.scale.shape == (5, 4)
    dequantized = spec.dequantize(spec.quantize(w.T)).T
    apply(model, LowerMatMulNBitsPass(MatMulNBitsOptions(accuracy_level=0)))
    assert op_types(model) == ["MatMulNBits", "Add"]
    np.testing.assert_allclose(run(model, {"x": x})[0], x @ dequantized + bias, rtol=1e-4, atol=1e-4)


def test_accuracy_level_4_quantizes_the_activations_and_stays_close():
    w = _weight(128, 16)
    model = _model(128, 16, "y = MatMul(x, w)", weights={"w": w})
    x = RNG.standard_normal((1, 4, 128)).astype(np.float32)
    apply(model, AssignBlockSpecsPass(BlockSpecOptions(block_size=32)))
    spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
    expected = x @ spec.dequantize(spec.quantize(w))
    apply(model, LowerMatMulNBitsPass(MatMulNBitsOptions(accuracy_level=4)))
    y = run(model, {"x": x})[0]
    relative = np.linalg.norm(y - expected) / np.linalg.norm(expected)
    assert 0 < relative < 0.02  # int8 activations per block: not exact, about a percent at most


def test_the_block_dequantize_form_at_opset_21_computes_the_same():
    """The portable lowering: DequantizeLinear with block_size feeding the MatMul."""
    w = _weight(70, 6)
    model = _model(70, 6, "y = MatMul(x, w)", weights={"w": w}, opset=21)
    x = RNG.standard_normal((2, 3, 70)).astype(np.float32)
    apply(model, AssignBlockSpecsPass(BlockSpecOptions(block_size=32, symmetric=False)))
    nbits = clone(model)
    spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
    nbits.graph.initializers["w"].meta[QUANT_SPEC_KEY] = spec
    apply(model, QuantizeWeightsPass())
    apply(nbits, LowerMatMulNBitsPass(MatMulNBitsOptions(accuracy_level=0)))
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    exact = {"session.qdq_matmulnbits_accuracy_level": "0"}  # else ORT fuses DQ + MatMul at level 4
    np.testing.assert_allclose(run(model, {"x": x}, exact)[0], run(nbits, {"x": x})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(model, {"x": x}, exact)[0], x @ spec.dequantize(spec.quantize(w)), rtol=1e-4,
                               atol=1e-4)


def test_weights_other_ops_read_or_shorter_than_a_block_stay_float_with_a_note():
    table = RNG.standard_normal((64, 8)).astype(np.float32)
    small = RNG.standard_normal((8, 4)).astype(np.float32)
    model = _model(64, 8, """
        y = MatMul(x, t)
        e = Gather(t, i)
        z = MatMul(e, s)
    """, inputs="float[B, {k}] x, int64[B] i", outputs="float[B, {n}] y, float[B, 4] z", weights={"t": table, "s": small})
    assert not apply(model, AssignBlockSpecsPass(BlockSpecOptions(block_size=32)))
    notes = " ".join(model.meta["qcompile.notes"])
    assert "read by other ops than MatMul / Gemm layers" in notes and "t" in notes
    assert "K shorter than one block of 32: s" in notes


def test_hqq_never_does_worse_than_round_to_nearest_by_its_measure_and_better_overall():
    w = np.random.default_rng(1).standard_normal((256, 48)).astype(np.float32)
    rtn = block_spec(w, 0, 64, symmetric=False)
    hqq = hqq_spec(w, rtn)
    assert hqq.method == "hqq" and hqq.zero_point.dtype == np.float32

    def block_errors(spec):
        return np.abs(spec.dequantize(spec.quantize(w)) - w).reshape(4, 64, 48).mean(axis=1)

    assert np.all(block_errors(hqq) <= block_errors(rtn) + 1e-7)
    assert block_errors(hqq).mean() < 0.97 * block_errors(rtn).mean()  # measured: 4-6% less


def test_hqq_float_zero_points_run_in_matmulnbits_and_integer_ones_behind_dequantize_linear():
    w = _weight(96, 6)
    x = RNG.standard_normal((2, 3, 96)).astype(np.float32)
    for integer, opset in ((False, 17), (True, 21)):
        model = _model(96, 6, "y = MatMul(x, w)", weights={"w": w}, opset=opset)
        apply(model, AssignBlockSpecsPass(BlockSpecOptions(block_size=32, symmetric=False)),
              FitBlockGridsHQQPass(HQQOptions(integer_zero_points=integer)))
        spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
        assert spec.method == "hqq" and (spec.zero_point.dtype.kind == "f") is not integer
        expected = x @ spec.dequantize(spec.quantize(w))
        apply(model, QuantizeWeightsPass() if integer else LowerMatMulNBitsPass(MatMulNBitsOptions(accuracy_level=0)))
        assert op_types(model) == (["DequantizeLinear", "MatMul"] if integer else ["MatMulNBits"])
        y = run(model, {"x": x}, {"session.qdq_matmulnbits_accuracy_level": "0"})[0]
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
