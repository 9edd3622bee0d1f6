import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import apply, op_types, parse, random_feed, run

import qcompile
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.layers import layer_precisions
from qcompile.models import synthetic
from qcompile.passes.lowering.lower_qoperator import LowerQOperatorPass


def _sqnr(expected, actual):
    return 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))


def _fake_quant(model, feed):
    """The Q/DQ model run op by op in float (no integer kernels): the reference for the integer ops."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _compile_both(tmp_path, build, **kwargs):
    source, calib = tmp_path / "in.onnx", tmp_path / "calib.npz"
    save_model(build(), source)
    np.savez(calib, **random_feed(build(), batch=16, seq=6, seed=1))
    qdq = qcompile.compile(source, recipe="w8a8", calib=str(calib), **kwargs).model
    qop = qcompile.compile(source, recipe="w8a8", calib=str(calib), options={"format": "qoperator"},
                           verify_each=True, **kwargs).model
    return qdq, qop


def test_cnn_runs_on_qlinear_ops_with_the_qdq_models_numbers(tmp_path):
    qdq, qop = _compile_both(tmp_path, synthetic.cnn)

    ops = op_types(qop)
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearAdd") == 1 and ops.count("QGemm") == 1
    assert not {"Conv", "Clip", "Add", "Gemm"} & set(ops)  # the ReLU6 clips are implied by the u8 output grids
    assert {layer["precision"] for layer in layer_precisions(qop)} == {"w:int8 a:uint8"}
    feed = random_feed(qdq, batch=4, seed=3)
    assert _sqnr(_fake_quant(qdq, feed), run(qop, feed)[0]) > 30
    assert not LowerQOperatorPass()(qop).modified


def test_transformer_matmuls_run_as_integer_matmuls(tmp_path):
    qdq, qop = _compile_both(tmp_path, synthetic.transformer_block)

    # QLinearMatMul where the output is quantized too (attention's context, read through Transpose and
    # Reshape by the quantized output projection), MatMulIntegerToFloat elsewhere.
    integer = [n for n in qop.graph if n.op_type in ("MatMulIntegerToFloat", "QLinearMatMul")]
    assert len(integer) == op_types(qdq).count("MatMul") and "MatMul" not in op_types(qop)
    assert all(n.domain == "com.microsoft" for n in integer if n.op_type == "MatMulIntegerToFloat")
    feed = random_feed(qdq, batch=2, seq=6, seed=3)
    assert _sqnr(_fake_quant(qdq, feed), run(qop, feed)[0]) > 30


def _conv_clip(output_scale: float) -> ir.Model:
    return parse(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[1, 2, 5, 5] x) => (float[1, 2, 5, 5] y)
            <float s = {{0.05}}, uint8 z = {{128}}, int8[2, 2, 1, 1] w = {{1, -2, 3, 4}}, float[2] ws = {{0.1, 0.2}},
             int8[2] wz = {{0, 0}}, float ys = {{{output_scale}}}, uint8 yz = {{0}}, float lo = {{0.0}}, float hi = {{6.0}}> {{
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            wd = DequantizeLinear<axis = 0>(w, ws, wz)
            c = Conv(d, wd)
            r = Clip(c, lo, hi)
            yq = QuantizeLinear(r, ys, yz)
            y = DequantizeLinear(yq, ys, yz)
        }}""")


@pytest.mark.parametrize("output_scale, clip_goes", [(6.0 / 255, True), (0.05, False)])
def test_a_clip_goes_only_when_the_output_grid_lies_inside_its_bounds(output_scale, clip_goes):
    model = _conv_clip(output_scale)
    feed = {"x": 3 * np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)}
    expected = _fake_quant(model, feed)

    assert apply(model, LowerQOperatorPass()) == clip_goes
    assert ("Clip" in op_types(model)) != clip_goes
    np.testing.assert_allclose(run(model, feed)[0], expected, atol=output_scale * 1.01)


@pytest.mark.parametrize("target", ["tensorrt", "portable"])
def test_qoperator_is_only_for_onnx_runtime_cpu(tmp_path, target):
    with pytest.raises(UsageError, match="format=qoperator"):
        _compile_both(tmp_path, synthetic.cnn, target=target)


def test_matmul_with_a_quantized_output_and_per_column_weight_becomes_qlinear_matmul():
    model = parse("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[3, 4] x) => (float[3, 2] y)
            <float s = {0.03}, uint8 z = {128}, int8[4, 2] w = {10, -20, 30, 40, -50, 60, 70, -80},
             float[2] ws = {0.01, 0.02}, int8[2] wz = {0, 0}, float ys = {0.05}, uint8 yz = {100}> {
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            wd = DequantizeLinear<axis = 1>(w, ws, wz)
            m = MatMul(d, wd)
            yq = QuantizeLinear(m, ys, yz)
            y = DequantizeLinear(yq, ys, yz)
        }""")
    feed = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    expected = _fake_quant(model, feed)

    assert apply(model, LowerQOperatorPass())

    assert op_types(model) == ["QuantizeLinear", "QLinearMatMul", "DequantizeLinear"]
    np.testing.assert_allclose(run(model, feed)[0], expected, atol=0.05 * 1.01)


@pytest.mark.parametrize("quantized_output", [False, True])
def test_gemm_with_int32_bias_becomes_qgemm(quantized_output):
    tail = "yq = QuantizeLinear(m, ys, yz)\n            y = DequantizeLinear(yq, ys, yz)" if quantized_output \
        else "y = Identity(m)"
    model = parse(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[3, 4] x) => (float[3, 2] y)
            <float s = {{0.03}}, uint8 z = {{128}}, int8[2, 4] w = {{10, -20, 30, 40, -50, 60, 70, -80}},
             float[2] ws = {{0.01, 0.02}}, int8[2] wz = {{0, 0}}, int32[2] b = {{100, -300}},
             float[2] bs = {{0.0003, 0.0006}}, int32[2] bz = {{0, 0}}, float ys = {{0.05}}, uint8 yz = {{100}}> {{
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            wd = DequantizeLinear<axis = 0>(w, ws, wz)
            bd = DequantizeLinear<axis = 0>(b, bs, bz)
            m = Gemm<transB = 1>(d, wd, bd)
            {tail}
        }}""")
    feed = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    expected = _fake_quant(model, feed)

    assert apply(model, LowerQOperatorPass())

    qgemm = [n for n in model.graph if n.op_type == "QGemm"]
    assert len(qgemm) == 1 and qgemm[0].domain == "com.microsoft" and "Gemm" not in op_types(model)
    assert (len(qgemm[0].inputs) == 9) == quantized_output  # y_scale, y_zero_point
    np.testing.assert_allclose(run(model, feed)[0], expected, atol=0.05 * 1.01 if quantized_output else 1e-5)


def test_gemm_with_a_scaled_bias_stays_qdq():
    # on the a_scale * w_scale grid (0.03 * 0.01), but QGemm has no beta
    model = parse("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[3, 4] x) => (float[3, 2] y)
            <float s = {0.03}, uint8 z = {128}, int8[2, 4] w = {10, -20, 30, 40, -50, 60, 70, -80},
             float ws = {0.01}, int8 wz = {0}, int32[2] b = {100, -300}, float bs = {0.0003}, int32 bz = {0}> {
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            wd = DequantizeLinear(w, ws, wz)
            bd = DequantizeLinear(b, bs, bz)
            y = Gemm<transB = 1, beta = 2.0>(d, wd, bd)
        }""")
    assert not LowerQOperatorPass()(model).modified
