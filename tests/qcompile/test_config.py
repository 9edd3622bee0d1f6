import numpy as np
import pytest
from helpers import random_feed

import qcompile
from qcompile.cli import main
from qcompile.config import CompileConfig, NodeSettings, settings_for
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.models import synthetic


@pytest.fixture
def cnn(tmp_path):
    path = tmp_path / "cnn.onnx"
    save_model(synthetic.cnn(), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **random_feed(synthetic.cnn(), batch=16, seed=1))
    return path, str(calib)


def _compile(cnn, tmp_path, toml: str):
    path, calib = cnn
    config = tmp_path / "recipe.toml"
    config.write_text('recipe = "w8a8"\n' + toml)
    # every Conv on integers: what the node settings change (a toy model may be placed in float)
    return qcompile.compile(path, calib=calib, config=config, options={"placement": "integer"}).model


def _conv(model, name):
    return next(n for n in model.graph if n.name == name)


def _input_scale(model, name):
    """The activation scale a node's data input is dequantized with."""
    return float(_conv(model, name).inputs[0].producer().inputs[1].const_value.numpy())


def _weight_scale(model, name):
    return _conv(model, name).inputs[1].producer().inputs[1].const_value.numpy()


def test_later_tables_win_and_unset_keys_fall_through():
    nodes = (NodeSettings(("block.*",), per_channel=False, calib_method="percentile"),
             NodeSettings(("block.pointwise",), per_channel=True))

    assert settings_for(nodes, "block.pointwise") == {"per_channel": True, "calib_method": "percentile"}
    assert settings_for(nodes, "block.depthwise") == {"per_channel": False, "calib_method": "percentile"}
    assert settings_for(nodes, "stem") == {}


def test_node_settings_change_only_the_matched_nodes(cnn, tmp_path):
    default = _compile(cnn, tmp_path, "")
    tuned = _compile(cnn, tmp_path, """
        [[nodes]]
        match = "block.pointwise"
        per_channel = false
        calib_method = "percentile"
        percentile = 90.0
        [[nodes]]
        match = ["classifier"]
        quantize = false
        """)

    assert _weight_scale(default, "block.pointwise").size == 16
    assert _weight_scale(tuned, "block.pointwise").size == 1
    assert _weight_scale(tuned, "block.depthwise").size == 16
    # The 90th percentile clips the pointwise input's range; the depthwise input keeps min/max.
    assert _input_scale(tuned, "block.pointwise") < 0.9 * _input_scale(default, "block.pointwise")
    assert _input_scale(tuned, "block.depthwise") == _input_scale(default, "block.depthwise")
    classifier = _conv(tuned, "classifier")
    assert classifier.inputs[1].const_value is not None  # float weight, no DequantizeLinear
    assert classifier.inputs[0].producer().op_type != "DequantizeLinear"


def test_readers_of_one_tensor_cannot_ask_for_different_calibration(cnn, tmp_path):
    # The residual Add and the depthwise conv both read the stem's output quantized.
    with pytest.raises(UsageError, match="stem.*ask for different calibration"):
        _compile(cnn, tmp_path, """
            [[nodes]]
            match = "block.depthwise"
            calib_method = "percentile"
            [[nodes]]
            match = "block.residual"
            calib_method = "mse"
            """)


@pytest.mark.parametrize("table, message", [
    ("match = 'x'\nbits = 4", "unknown key 'bits'"),
    ("per_channel = true", "match must be"),
    ("match = 'x'\ncalib_method = 'max'", "calib_method must be one of"),
    ("match = 'x'\npercentile = 0", r"percentile must be a number in \(0, 100\]"),
    ("match = 'x'\nquantize = 'no'", "quantize must be true or false"),
    ("match = 'x'\nactivation_bits = 12", "activation_bits must be 8 or 16"),
    ("match = 'x'\nactivation_bits = 16.0", "activation_bits must be 8 or 16"),
])
def test_bad_node_tables_are_usage_errors(tmp_path, capsys, table, message):
    config = tmp_path / "recipe.toml"
    config.write_text("[[nodes]]\n" + table + "\n")

    with pytest.raises(UsageError, match=message):
        CompileConfig.load(config)


def test_cli_reports_a_bad_table_in_one_line(cnn, tmp_path, capsys):
    config = tmp_path / "recipe.toml"
    config.write_text("[[nodes]]\nmatch = 'stem'\nbits = 4\n")

    code = main(["compile", str(cnn[0]), "-o", str(tmp_path / "out.onnx"), "--config", str(config)])

    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "[[nodes]] table 1: unknown key 'bits'" in lines[0]


def test_node_settings_a_recipe_does_not_read_are_noted(cnn, tmp_path):
    path, calib = cnn
    config = tmp_path / "weights-only.toml"
    config.write_text('recipe = "w8a16"\n[[nodes]]\nmatch = ["*"]\ncalib_method = "percentile"\nper_channel = false\n')
    notes = qcompile.compile(path, calib=calib, config=config).report["notes"]
    assert any("calib_method" in n and "calibrate-activations" in n for n in notes)
    assert not any("per_channel" in n and "not used" in n for n in notes)  # w8a16 reads it
    config.write_text('recipe = "w8a8"\n[[nodes]]\nmatch = ["*"]\ncalib_method = "percentile"\npercentile = 99.9\n')
    assert not any("[[nodes]]" in n for n in qcompile.compile(path, calib=calib, config=config).report["notes"])
    config.write_text('recipe = "w8a8"\n[[nodes]]\nmatch = ["*"]\npercentile = 99.9\n')
    notes = qcompile.compile(path, calib=calib, config=config).report["notes"]
    assert any("percentile = 99.9 was not used: these nodes are calibrated with minmax" in n for n in notes)


def test_patterns_that_name_no_node_of_the_compiled_model_are_noted(cnn, tmp_path):
    path, calib = cnn
    config = tmp_path / "recipe.toml"
    config.write_text('recipe = "w8a8"\n[[nodes]]\nmatch = ["classifer"]\nper_channel = false\n')
    # stem.bn is folded into the stem Conv; "stem" itself is there
    notes = qcompile.compile(path, calib=calib, config=config, exclude=("stem.bn", "stem")).report["notes"]
    assert any(n.startswith("--exclude 'stem.bn' matches no node") and "folded into others" in n for n in notes)
    assert any(n.startswith("[[nodes]] match 'classifer' matches no node") and "nor of the input" in n
               for n in notes)
    assert not any("'stem'" in n for n in notes)
