"""INT32 biases: on the accumulator's grid where it holds them, float where it would wrap."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile

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


@pytest.mark.parametrize("weight_scale, bias_scale", [(1e-4, 100.0), (1e-6, 1000.0)])
def test_tiny_weights_under_a_large_bias_keep_a_float_bias_and_their_accuracy(tmp_path, weight_scale, bias_scale):
    result, sqnr = _gemm(tmp_path, weight_scale, bias_scale)
    assert sqnr >= 30  # an INT32 bias wrapped here: -0.8 dB
    assert any(note.startswith("fc: bias left float") for note in result.report["notes"])
    bias_inputs = [node.inputs[2] for node in result.model.graph if node.op_type == "Gemm"]
    assert bias_inputs[0].producer() is None  # no DequantizeLinear of an INT32 bias


def test_ordinary_weights_get_an_int32_bias(tmp_path):
    result, sqnr = _gemm(tmp_path, 0.1, 1.0)
    gemm = next(node for node in result.model.graph if node.op_type == "Gemm")
    dequantize = gemm.inputs[2].producer()
    assert dequantize is not None and dequantize.inputs[0].const_value.numpy().dtype == np.int32
    assert not any("bias left float" in note for note in result.report["notes"])
    assert sqnr > 25
