"""Weights held in Constant nodes (paddle2onnx's export style) become initializers, and get quantized."""
import numpy as np
import onnx
import onnx_ir as ir
from helpers import apply, op_types, run
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.io import save_model
from qcompile.passes.canonicalize.lift_constant_nodes import LiftConstantNodesPass

RNG = np.random.default_rng(0)


def _paddle_style() -> ir.Model:
    """Conv -> Relu -> Gemm at opset 12, every weight and bias in a Constant node, a shape in value_ints."""
    def constant(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32), name))

    nodes = [constant("w_conv", RNG.standard_normal((8, 3, 3, 3)) * 0.3), constant("b_conv", RNG.standard_normal(8)),
             constant("w_fc", RNG.standard_normal((64, 8 * 6 * 6)) * 0.05), constant("b_fc", RNG.standard_normal(64)),
             helper.make_node("Constant", [], ["flat"], value_ints=[0, -1]),
             helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["h"], name="conv"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "flat"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    return ir.serde.deserialize_model(model)


def test_tensor_constants_become_initializers_and_the_function_is_unchanged():
    model = _paddle_style()
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = run(model, {"x": x})[0]
    assert apply(model, LiftConstantNodesPass())
    assert set(model.graph.initializers) == {"w_conv", "b_conv", "w_fc", "b_fc"}
    assert op_types(model).count("Constant") == 1  # the value_ints shape stays a node
    np.testing.assert_array_equal(run(model, {"x": x})[0], before)
    assert not apply(model, LiftConstantNodesPass())


def test_a_model_with_weights_in_constant_nodes_gets_integer_weights(tmp_path):
    source = tmp_path / "paddle.onnx"
    save_model(_paddle_style(), source)
    calib, data = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=RNG.standard_normal((16, 3, 8, 8)).astype(np.float32))
    np.savez(data, x=RNG.standard_normal((16, 3, 8, 8)).astype(np.float32))
    result = qcompile.compile(source, recipe="w8a8", calib=str(calib))
    assert {layer["name"]: layer["precision"] for layer in result.report["layers"]} == {
        "conv": "w:int8 a:uint8", "fc": "w:int8 a:uint8"}
    result.save(tmp_path / "out.onnx")
    assert result.report["size_bytes"]["after"] < 0.5 * result.report["size_bytes"]["before"]
    (output,) = result.verify(str(data))["outputs"]
    assert output["sqnr_db"] > 25  # 8-bit weights and activations on two layers
    stored = onnx.load(str(tmp_path / "out.onnx"))
    assert not any(node.op_type == "Constant" and node.output[0].startswith("w_") for node in stored.graph.node)
