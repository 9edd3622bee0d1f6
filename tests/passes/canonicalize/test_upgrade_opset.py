import numpy as np
import onnx_ir as ir
import pytest
from helpers import apply, clone, parse, random_feed, run

import qcompile
from qcompile.io import save_model
from qcompile.notes import notes
from qcompile.passes.canonicalize.upgrade_opset import UpgradeOpsetPass
from qcompile.passes.canonicalize import upgrade_opset

# ReLU6 as the TorchScript exporter writes it below opset 11 (Clip bounds as attributes) and from 11
# on (bounds as inputs).
CONV_CLIP = {
    9: "r = Clip<min = 0.0, max = 6.0>(c)",
    10: "r = Clip<min = 0.0, max = 6.0>(c)",
    11: "r = Clip(c, lo, hi)",
}


def _conv_clip(opset: int) -> ir.Model:
    weights = ", ".join(str(v) for v in np.linspace(-1.5, 2.0, 3 * 2 * 3 * 3).round(3))
    return parse(f"""
        <ir_version: 7, opset_import: ["" : {opset}]>
        g (float[1, 2, 6, 6] x) => (float[1, 3, 6, 6] r)
            <float[3, 2, 3, 3] w = {{{weights}}}, float[3] b = {{0.1, -0.2, 0.3}}, float lo = {{0.0}},
             float hi = {{6.0}}> {{
            c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
            {CONV_CLIP[min(opset, 11)]}
        }}""")


@pytest.mark.parametrize("opset", [10, 11, 12])
def test_raises_old_opsets_to_13_with_the_same_outputs(opset):
    model = _conv_clip(opset)
    reference = clone(model)

    assert apply(model, UpgradeOpsetPass())

    assert model.opset_imports[""] == 13
    clip = next(node for node in model.graph if node.op_type == "Clip")
    assert len(clip.inputs) == 3 and not clip.attributes  # the bounds are inputs from opset 11
    feed = random_feed(model, seed=1)
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0], rtol=1e-6)
    assert notes(model) == [f"opset {opset} raised to 13, where DequantizeLinear takes per-channel scales"]
    assert not UpgradeOpsetPass()(model).modified


def test_leaves_opset_13_and_later_alone():
    model = _conv_clip(13)

    assert not apply(model, UpgradeOpsetPass())
    assert model.opset_imports[""] == 13 and not notes(model)


def _weight_scales(model: ir.Model) -> list[np.ndarray]:
    """The scales of the DequantizeLinear nodes that read a constant 4-D (Conv) weight."""
    return [node.inputs[1].const_value.numpy() for node in model.graph
            if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None
            and len(node.inputs[0].shape) == 4]


def _compile(tmp_path, model: ir.Model) -> qcompile.CompileResult:
    source, calib = tmp_path / "in.onnx", tmp_path / "calib.npz"
    save_model(model, source)
    np.savez(calib, **random_feed(model, seed=2))
    return qcompile.compile(source, recipe="w8a8", calib=str(calib))


def test_an_opset_11_model_gets_per_channel_weights(tmp_path):
    result = _compile(tmp_path, _conv_clip(11))

    assert result.model.opset_imports[""] == 13
    [scales] = _weight_scales(result.model)
    assert scales.shape == (3,) and len(set(scales)) == 3


def test_a_model_the_converter_fails_on_keeps_its_opset_and_says_its_weights_are_per_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(upgrade_opset, "ConvertVersionPass", lambda *args, **kwargs: (lambda model: None))

    result = _compile(tmp_path, _conv_clip(11))

    assert result.model.opset_imports[""] == 11
    [scales] = _weight_scales(result.model)
    assert scales.shape == ()
    assert "opset 11 kept: onnx's version converter could not raise it to 13" in result.report["notes"]
    assert ("1 weights per tensor, not per channel: opset 11 has no per-channel DequantizeLinear (opset 13 has)"
            in result.report["notes"])


def test_a_model_kept_below_opset_10_is_left_float_with_a_note_not_broken(tmp_path, monkeypatch):
    """Opset 9 has no QuantizeLinear / DequantizeLinear: nothing can be quantized, and the output must stay valid."""
    monkeypatch.setattr(upgrade_opset, "ConvertVersionPass", lambda *args, **kwargs: (lambda model: None))

    result = _compile(tmp_path, _conv_clip(9))

    assert result.model.opset_imports[""] == 9
    assert not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in result.model.graph)
    # said once, though select-quantized-ops and assign-weight-specs both find it
    assert result.report["notes"].count("opset 9 has no QuantizeLinear/DequantizeLinear (opset 10 has): every "
                                        "layer computes in float") == 1
    # weights stored INT8 all the same: a Cast and a Mul decode them, which opset 9 has
    assert {layer["precision"] for layer in result.report["layers"]} == {"w:int8 a:fp32"}
