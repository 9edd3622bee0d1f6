"""INT32 biases: on the accumulator's grid, with weight steps that leave it room; float where it would wrap."""
import numpy as np
import onnx_ir as ir
import pytest
from helpers import parse
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.decisions import QUANT_SPEC_KEY, activation_spec, symmetric_weight_spec
from qcompile.notes import notes
from qcompile.passes.analysis.assign_bias_specs import AssignBiasSpecsPass

RNG = np.random.default_rng(0)


def _gemm(tmp_path, weight_scale: float, bias_scale: float):
    weight = numpy_helper.from_array((RNG.standard_normal((16, 32)) * weight_scale).astype(np.float32), "W")
    bias = numpy_helper.from_array((RNG.standard_normal(16) * bias_scale).astype(np.float32), "B")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "gemm.onnx"
    path.write_bytes(model.SerializeToString())
    for name in ("calib", "eval"):
        np.savez(tmp_path / f"{name}.npz", x=RNG.standard_normal((32, 32)).astype(np.float32))
    result = qcompile.compile(path, recipe="w8a8", calib=str(tmp_path / "calib.npz"))
    result.save(tmp_path / "out.onnx")
    (output,) = result.verify(str(tmp_path / "eval.npz"))["outputs"]
    return result, output["sqnr_db"]


@pytest.mark.parametrize("weight_scale, bias_scale", [(1e-4, 100.0), (1e-6, 1000.0), (1e-39, 10.0)])
def test_tiny_weights_under_a_large_bias_keep_an_int32_bias_and_their_accuracy(tmp_path, weight_scale, bias_scale):
    """The weight step grows until the bias fits its INT32 grid (it wrapped before: -0.8 dB); 1e-39 is the
    denormal weights of dead channels that paddle exports carry."""
    result, sqnr = _gemm(tmp_path, weight_scale, bias_scale)
    assert sqnr >= 30
    gemm = next(node for node in result.model.graph if node.op_type == "Gemm")
    assert gemm.inputs[2].producer().inputs[0].const_value.numpy().dtype == np.int32
    assert not any("bias left float" in note for note in result.report["notes"])


def test_a_bias_its_int32_grid_cannot_hold_stays_float_with_a_note():
    model = parse("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 2] y) <float[2, 4] w = {1, 2, 3, 4, 5, 6, 7, 8}, float[2] b = {5.0, 1e6}> {
            y = Gemm<transB = 1>(x, w, b)
        }
    """)
    x, w, b = next(iter(model.graph)).inputs
    x.meta[QUANT_SPEC_KEY] = activation_spec(-1.0, 1.0, ir.DataType.UINT8, "minmax")
    w.meta[QUANT_SPEC_KEY] = symmetric_weight_spec(w.const_value.numpy(), 0, ir.DataType.INT8, 127)
    assert not AssignBiasSpecsPass()(model).modified  # 1e6 / (2/255 * 8/127) levels: 2e9 > 2^30
    assert QUANT_SPEC_KEY not in b.meta
    assert any("bias left float" in note for note in notes(model))


def test_ordinary_weights_get_an_int32_bias(tmp_path):
    result, sqnr = _gemm(tmp_path, 0.1, 1.0)
    gemm = next(node for node in result.model.graph if node.op_type == "Gemm")
    dequantize = gemm.inputs[2].producer()
    assert dequantize is not None and dequantize.inputs[0].const_value.numpy().dtype == np.int32
    assert not any("bias left float" in note for note in result.report["notes"])
    assert sqnr > 25
