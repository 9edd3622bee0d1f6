import numpy as np
import onnx
import onnx_ir as ir
from helpers import apply, clone, run
from onnx import TensorProto, helper, numpy_helper

from qcompile.calibration import CalibrationData
from qcompile.decisions import MEAN_KEY
from qcompile.notes import notes
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass
from qcompile.passes.analysis.calibrate_activations import CalibrateActivationsPass
from qcompile.passes.analysis.select_quantized_ops import SelectQuantizedOpsPass
from qcompile.passes.lowering.correct_bias import CorrectBiasPass
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.passes.analysis import measure_bias_shift
from qcompile.passes.analysis.calibrate_activations import CalibrateOptions
from qcompile.passes.analysis.measure_bias_shift import MeasureBiasShiftOptions, MeasureBiasShiftPass
from qcompile.passes.analysis.select_quantized_ops import SelectOptions


def _model(with_bias=True, shared_bias=False) -> ir.Model:
    """A depthwise 3x3 conv (small kernels: their rounding errors do not average out) and a Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 1, 3, 3)).astype(np.float32), "w_conv"),
             numpy_helper.from_array(rng.standard_normal((5, 6 * 4 * 4)).astype(np.float32) * 0.1, "w_fc"),
             numpy_helper.from_array(np.zeros(6, np.float32), "b_conv"),
             numpy_helper.from_array(np.zeros(5, np.float32), "b_fc"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat")]
    conv_inputs = ["x", "w_conv", "b_conv"] if with_bias else ["x", "w_conv"]
    nodes = [helper.make_node("Conv", conv_inputs, ["h"], name="conv", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["h", "flat"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
               helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 6, 4, 4])]
    if shared_bias:
        nodes.append(helper.make_node("Reshape", ["b_conv", "shape_4d"], ["b_conv_4d"], name="bias_4d"))
        nodes.append(helper.make_node("Add", ["h", "b_conv_4d"], ["z"], name="uses_bias"))
        inits.append(numpy_helper.from_array(np.array([1, 6, 1, 1], np.int64), "shape_4d"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6, 4, 4]))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4, 4])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))


def _data(tmp_path, n=32, seed=1):
    # Positive inputs with a large mean, as images after a ReLU: the case bias correction is for.
    x = (np.random.default_rng(seed).random((n, 6, 4, 4)) * 4 + 2).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return str(tmp_path / "calib.npz"), x


def _quantize(model, data=None):
    correct = _correct(data) if data else []
    apply(model, AssignWeightSpecsPass(), *correct, QuantizeWeightsPass())
    return model


def _correct(data: str) -> list:
    return [MeasureBiasShiftPass(MeasureBiasShiftOptions(CalibrationData(data))), CorrectBiasPass()]


def test_the_mean_error_of_each_channel_is_removed(tmp_path):
    data, x = _data(tmp_path)
    reference = run(_model(), {"x": x})
    plain = run(_quantize(_model()), {"x": x})
    corrected = run(_quantize(_model(), data), {"x": x})

    def conv_shift(outputs):  # per channel, over batch and positions, of the conv output
        return np.abs((outputs[1] - reference[1]).mean(axis=(0, 2, 3))).max()

    assert conv_shift(corrected) < 1e-4 < 1e-2 < conv_shift(plain)
    for output in range(2):
        assert np.sum((corrected[output] - reference[output]) ** 2) < np.sum((plain[output] - reference[output]) ** 2)


def test_a_conv_without_bias_gets_one(tmp_path):
    data, x = _data(tmp_path)
    model = _model(with_bias=False)
    before = clone(model)
    apply(model, AssignWeightSpecsPass(), *_correct(data))
    conv = next(n for n in model.graph if n.name == "conv")
    assert len(conv.inputs) == 3 and np.abs(conv.inputs[2].const_value.numpy()).max() > 0
    # The weights are not rounded yet: the new bias is the only change, one constant per channel.
    change = run(model, {"x": x})[1] - run(before, {"x": x})[1]
    np.testing.assert_allclose(change, change[:1, :, :1, :1] + np.zeros_like(change), atol=1e-5)


def test_a_bias_other_nodes_read_is_left_alone(tmp_path):
    data, _ = _data(tmp_path)
    model = _model(shared_bias=True)
    apply(model, AssignWeightSpecsPass(), *_correct(data))
    assert not np.any(model.graph.initializers["b_conv"].const_value.numpy())
    assert np.any(model.graph.initializers["b_fc"].const_value.numpy())


def test_nothing_to_correct_without_quantized_weights(tmp_path):
    data, _ = _data(tmp_path)
    assert not apply(_model(), *_correct(data))


def test_gemm_with_transposed_input_is_corrected_along_its_rows(tmp_path):
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Gemm", ["xt", "w", "b"], ["y"], name="fc", transA=1, transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(5, np.float32), "b")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    x = (rng.random((32, 8)) * 4 + 2).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    reference = run(clone(model), {"x": x})[0]
    plain = run(_quantize(clone(model)), {"x": x})[0]
    corrected = run(_quantize(model, str(tmp_path / "calib.npz")), {"x": x})[0]
    assert np.abs((corrected - reference).mean(axis=0)).max() < 1e-4 < np.abs((plain - reference).mean(axis=0)).max()


def test_mean_inputs_from_calibration_give_the_probed_correction_without_a_run(tmp_path, monkeypatch):
    data, x = _data(tmp_path)
    probed = _quantize(_model(), data)
    model = _model()
    apply(model, SelectQuantizedOpsPass(SelectOptions()),
          CalibrateActivationsPass(CalibrateOptions(CalibrationData(data), record_means=True)))
    conv = next(node for node in model.graph if node.op_type == "Conv")
    np.testing.assert_allclose(conv.inputs[0].meta[MEAN_KEY], x.mean(axis=0), rtol=1e-5)

    def no_run(*args, **kwargs):
        raise AssertionError("measure-bias-shift ran the model although calibration had recorded the mean inputs")

    monkeypatch.setattr(measure_bias_shift, "CalibrationRunner", no_run)
    _quantize(model, data)
    assert MEAN_KEY not in conv.inputs[0].meta  # consumed: no copy of the activations lingers
    for bias in ("b_conv", "b_fc"):
        np.testing.assert_allclose(model.graph.initializers[bias].const_value.numpy(),
                                   probed.graph.initializers[bias].const_value.numpy(), rtol=1e-4, atol=1e-6)


def test_layers_whose_calibration_inputs_hold_nan_keep_their_bias_and_get_a_note(tmp_path):
    _, x = _data(tmp_path)
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    model = _quantize(_model(), str(tmp_path / "nan.npz"))
    for name in ("b_conv", "b_fc"):
        bias = next(v for v in model.graph.initializers.values() if v.name.startswith(name)).const_value.numpy()
        assert np.isfinite(bias).all()
    assert any("bias correction skipped for 2 layers whose inputs had NaN or Inf" in n for n in notes(model))


def test_inputs_of_several_sizes_are_corrected_as_the_mean_over_every_sample(tmp_path):
    """Images of two sizes (a folder of .npz): the shift is taken per size and weighted by samples, so the
    corrected conv's mean output error per channel, averaged over the samples, is zero."""
    rng = np.random.default_rng(3)
    conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv", group=6, pads=[1, 1, 1, 1])
    graph = helper.make_graph([conv], "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, "H", "W"])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 6, "H", "W"])],
                              [numpy_helper.from_array(rng.standard_normal((6, 1, 3, 3)).astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "calib"
    folder.mkdir()
    sizes = {4: 24, 7: 8}  # side: samples
    images = {side: (rng.random((n, 6, side, side)) * 4 + 2).astype(np.float32) for side, n in sizes.items()}
    for side, x in images.items():
        np.savez(folder / f"{side}.npz", x=x)

    def model():
        return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))

    reference, corrected = model(), _quantize(model(), str(folder))
    assert not any("skipped" in note for note in notes(corrected))
    per_size = [(run(corrected, {"x": x})[0] - run(reference, {"x": x})[0]).mean(axis=(0, 2, 3)) * len(x)
                for x in images.values()]
    plain = _quantize(model())
    plain_error = sum((run(plain, {"x": x})[0] - run(reference, {"x": x})[0]).mean(axis=(0, 2, 3)) * len(x)
                      for x in images.values()) / sum(sizes.values())
    assert np.abs(sum(per_size) / sum(sizes.values())).max() < 1e-4 < 1e-2 < np.abs(plain_error).max()
