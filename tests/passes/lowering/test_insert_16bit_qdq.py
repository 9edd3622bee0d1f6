"""16-bit activations for the nodes a [[nodes]] table names (activation_bits = 16)."""
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import random_feed, run

import qcompile
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile.passes.analysis.calibrate_activations import CalibrateActivationsPass
from qcompile.target_check import target_problems
from qcompile.targets import TARGETS
from qcompile.targets.x86 import PAIR_LIMIT, reduction_axes, worst_pair_sum

# The readers of the depthwise output (only the pointwise conv) and of the stem output (the depthwise
# conv and the residual Add) get 16-bit inputs; the rest of the model stays 8-bit. (Readers that ask
# for nothing follow the one that asks: matching the depthwise conv alone would do for the stem output.)
WIDE = '[[nodes]]\nmatch = ["block.pointwise", "block.depthwise", "block.residual"]\nactivation_bits = 16\n'


def _compile(tmp_path, toml, opset=None, **kwargs):
    model = synthetic.cnn()
    if opset is not None:
        model.opset_imports[""] = opset
    source = tmp_path / "in.onnx"
    save_model(model, source)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **random_feed(model, batch=16, seed=1))
    config = tmp_path / "recipe.toml"
    config.write_text('recipe = "w8a8"\n' + toml)
    return qcompile.compile(source, calib=str(calib), config=config, **kwargs)


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def _sqnr(expected, actual):
    return 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))


def test_matched_readers_get_int16_qdq_in_contrib_domain_below_opset_21(tmp_path):
    result = _compile(tmp_path, WIDE)
    model = result.model
    for name in ("block.depthwise", "block.pointwise"):
        dequantize = _node(model, name).inputs[0].producer()
        assert (dequantize.domain, dequantize.inputs[0].dtype) == ("com.microsoft", ir.DataType.INT16)
        assert dequantize.inputs[2].const_value.numpy().dtype == np.int16
        # no integer kernel reads a 16-bit input: the bias stays float (an INT32 one could overflow)
        assert _node(model, name).inputs[2].const_value.dtype == ir.DataType.FLOAT
    stem, classifier = _node(model, "stem"), _node(model, "classifier")
    assert stem.inputs[0].producer().inputs[0].dtype == ir.DataType.UINT8
    assert stem.inputs[2].producer().inputs[0].dtype == ir.DataType.INT32
    assert classifier.inputs[0].producer().inputs[0].dtype == ir.DataType.UINT8
    precisions = {row["name"]: row["precision"] for row in result.report["layers"]}
    assert precisions["block.pointwise"] == "w:int8 a:int16" and precisions["stem"] == "w:int8 a:uint8"
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    # the 16-bit-input convs run in float: full-range weights; the 8-bit stem keeps its pairs within 128
    weights = {name: _node(model, name).inputs[1].producer().inputs[0].const_value.numpy().astype(np.int32)
               for name in ("stem", "block.depthwise", "block.pointwise")}
    assert np.all(np.abs(weights["block.pointwise"]).max(axis=(1, 2, 3)) == 127)  # every channel
    assert worst_pair_sum(weights["stem"], reduction_axes("Conv", weights["stem"].shape, 1, False)) <= PAIR_LIMIT
    assert target_problems(model, TARGETS["ort-cpu"]) == []

    feed = random_feed(model, batch=4, seed=7)
    eight_bit = _compile(tmp_path, "").model
    reference = run(synthetic.cnn(), feed)[0]
    assert _sqnr(reference, run(model, feed)[0]) > _sqnr(reference, run(eight_bit, feed)[0])


def test_int16_grid_holds_the_tensor_to_half_a_step_in_onnx_runtime(tmp_path):
    model = _compile(tmp_path, WIDE).model
    dequantize = _node(model, "block.pointwise").inputs[0].producer()
    quantize = dequantize.inputs[0].producer()
    model.graph.outputs.extend([quantize.inputs[0], dequantize.outputs[0]])
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    # unseen data, twice the calibration's spread: the 4x headroom still holds it
    feed = {"pixel_values": 2 * random_feed(model, batch=4, seed=11)["pixel_values"]}
    _, x, dequantized = session.run(None, feed)
    scale = float(dequantize.inputs[1].const_value.numpy())
    assert np.abs(dequantized - x).max() <= scale / 2 * (1 + 1e-5)


def test_opset_21_model_gets_standard_int16_qdq(tmp_path):
    model = _compile(tmp_path, WIDE, opset=21).model
    dequantize = _node(model, "block.pointwise").inputs[0].producer()
    assert (dequantize.domain, dequantize.inputs[0].dtype) == ("", ir.DataType.INT16)
    assert "com.microsoft" not in model.opset_imports
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    feed = random_feed(model, batch=2, seed=3)
    assert _sqnr(run(synthetic.cnn(), feed)[0], run(model, feed)[0]) > 20


def test_qoperator_format_keeps_16bit_convs_on_qdq(tmp_path):
    model = _compile(tmp_path, WIDE, options={"format": "qoperator"}).model
    ops = {n.name: n.op_type for n in model.graph}
    assert ops["classifier"] == "QGemm"  # reads and writes 8 bits
    # the stem writes a 16-bit tensor, the block convs read one
    assert ops["stem"] == ops["block.pointwise"] == ops["block.depthwise"] == "Conv"
    feed = random_feed(model, batch=2, seed=3)
    assert _sqnr(run(synthetic.cnn(), feed)[0], run(model, feed)[0]) > 20


@pytest.mark.parametrize("toml, kwargs, message", [
    (WIDE, {"target": "tensorrt"}, "TensorRT takes 8-bit integer Q/DQ only"),
    (WIDE, {"target": "portable"}, "need opset 21, the model has opset 18"),
    # the stem output is read by the depthwise conv and the residual Add
    ('[[nodes]]\nmatch = "block.depthwise"\nactivation_bits = 16\n[[nodes]]\nmatch = "block.residual"\n'
     'activation_bits = 8\n', {}, "ask for different calibration"),
    (WIDE + 'calib_method = "entropy"\n', {}, "searches the range for an 8-bit grid"),
])
def test_16bit_requests_a_target_or_model_cannot_take_are_usage_errors(tmp_path, toml, kwargs, message):
    with pytest.raises(UsageError, match=message):
        _compile(tmp_path, toml, **kwargs)


def test_portable_below_opset_21_is_refused_before_calibrating(tmp_path, monkeypatch):
    def no_calibration(self, model):
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(CalibrateActivationsPass, "call", no_calibration)
    with pytest.raises(UsageError, match="match 'block.pointwise': activation_bits = 16 needs .* opset 18"):
        _compile(tmp_path, WIDE, target="portable")


def test_recipe_level_entropy_gives_16bit_tensors_minmax_with_headroom(tmp_path):
    model = _compile(tmp_path, '[options]\ncalib_method = "entropy"\n' + WIDE).model
    dequantize = _node(model, "block.pointwise").inputs[0].producer()
    name = dequantize.inputs[0].producer().inputs[0].name  # the depthwise conv's ReLU6 output
    reference = synthetic.cnn()
    reference.graph.outputs.append(next(v for n in reference.graph for v in n.outputs if v.name == name))
    calibration = dict(np.load(tmp_path / "calib.npz"))
    x = run(reference, calibration)[1]
    assert x.min() >= 0
    scale = float(dequantize.inputs[1].const_value.numpy())
    np.testing.assert_allclose(scale * 65535, min(4 * x.max(), 6), rtol=1e-5)  # headroom, up to ReLU6's 6
    assert 4 * x.max() > 6  # so the cut is what this checks


def test_fold_qdq_moves_pass_through_ops_onto_contrib_16bit_tensors(tmp_path):
    model = _compile(tmp_path, '[[nodes]]\nmatch = "*"\nactivation_bits = 16\n').model
    flatten = _node(model, "flatten")
    assert flatten.inputs[0].dtype == ir.DataType.INT16  # Flatten works on the integers, no requantization
    assert [u.op_type for u, _ in flatten.outputs[0].uses()] == ["DequantizeLinear"]
    feed = random_feed(model, batch=2, seed=3)
    assert _sqnr(run(synthetic.cnn(), feed)[0], run(model, feed)[0]) > 20
