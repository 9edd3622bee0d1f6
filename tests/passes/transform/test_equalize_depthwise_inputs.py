import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import apply, clone, op_types, run
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.calibration import CalibrationData
from qcompile.passes.analysis.choose_equalization import ChooseEqualizationOptions, ChooseEqualizationPass
from qcompile.io import save_model
from qcompile.passes.transform.equalize_depthwise_inputs import EqualizeDepthwiseInputsPass
from qcompile.decisions import CHANNEL_SCALE_KEY, read_channel_scale


def _chain(activation="Clip", depthwise=True) -> ir.Model:
    """x -> Conv 1x1 (channels of very different ranges) -> activation -> 3x3 conv (depthwise or not)."""
    rng = np.random.default_rng(0)
    spread = np.geomspace(0.05, 1.0, 8).astype(np.float32).reshape(8, 1, 1, 1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32) * spread, "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 1 if depthwise else 8, 3, 3)).astype(np.float32) / spread, "w2"),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    act = (helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act") if activation == "Clip"
           else helper.make_node("Relu", ["h"], ["a"], name="act"))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
        act,
        helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", group=8 if depthwise else 1, pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))


def _data(tmp_path, n=16, seed=1):
    x = np.random.default_rng(seed).standard_normal((n, 4, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return str(tmp_path / "calib.npz"), x


def _equalize(model, data):
    return apply(model, ChooseEqualizationPass(ChooseEqualizationOptions(CalibrationData(data))),
                 EqualizeDepthwiseInputsPass())


@pytest.mark.parametrize("activation", ["Clip", "Relu"])
def test_channels_span_one_range_and_the_function_is_unchanged(tmp_path, activation):
    data, x = _data(tmp_path)
    model = _chain(activation)
    before = clone(model)
    assert _equalize(model, data)
    assert op_types(model) == op_types(before)

    np.testing.assert_allclose(run(model, {"x": x})[0], run(before, {"x": x})[0], rtol=1e-4, atol=1e-4)
    unseen = np.random.default_rng(7).standard_normal((4, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": unseen})[0], run(before, {"x": unseen})[0], rtol=1e-3, atol=1e-3)

    activation_value = next(n for n in model.graph if n.name == "act").outputs[0]
    model.graph.outputs.append(activation_value)
    channel_max = run(model, {"x": x})[1].max(axis=(0, 2, 3))
    np.testing.assert_allclose(channel_max, channel_max.max(), rtol=1e-4)
    scales = read_channel_scale(activation_value.metadata_props[CHANNEL_SCALE_KEY])
    assert scales.shape == (8, 1, 1) and scales.min() == pytest.approx(1.0) and scales.max() > 10


def test_a_regular_conv_after_the_activation_is_left_alone(tmp_path):
    data, _ = _data(tmp_path)
    model = _chain(depthwise=False)
    assert not _equalize(model, data)


def test_w8a8_is_more_accurate_with_equalization(tmp_path):
    data, x = _data(tmp_path, n=32)
    source = save_model(_chain(), tmp_path / "in.onnx")
    reference = run(_chain(), {"x": x})[0]

    def sqnr(equalize: str) -> float:
        out = qcompile.compile(source, recipe="w8a8", calib=data, options={"equalize": equalize}).model
        y = run(out, {"x": x})[0]
        return 10 * np.log10(np.sum(reference**2) / np.sum((reference - y) ** 2))

    assert sqnr("true") > sqnr("false") + 3
