"""`fp8` end to end: E4M3 weights and activations as Q/DQ, run in ONNX Runtime against a numpy emulation."""
import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile.errors import UsageError
from qcompile.graph import constant_array
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile.target_check import target_problems
from qcompile.targets import TARGETS
from qcompile.verify import worst_sqnr_db
from tests.helpers import parse, random_feed, run

LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 32] x) => (float[N, 16] y) <float[32, 16] w = {%s}> {
    y = MatMul(x, w)
}
""" % ", ".join(f"{v:.5f}" for v in np.random.default_rng(1).standard_normal(32 * 16))


def _float8(x: np.ndarray, dtype=ml_dtypes.float8_e4m3fn) -> np.ndarray:
    """Round to the FP8 type, saturating at its largest finite value (QuantizeLinear's saturate=1)."""
    largest = float(ml_dtypes.finfo(dtype).max)
    return np.clip(x, -largest, largest).astype(dtype).astype(np.float64)


@pytest.fixture
def linear(tmp_path):
    path = tmp_path / "linear.onnx"
    save_model(parse(LINEAR), path)
    calib = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=calib)
    return path, str(tmp_path / "calib.npz"), calib


@pytest.mark.parametrize("activations, dtype", [("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)])
def test_fp8_computes_what_numpy_does_and_saturates_beyond_the_calibrated_range(linear, activations, dtype):
    path, calib, samples = linear
    model = qcompile.compile(path, recipe="fp8", calib=calib, options={"activations": activations}).model
    assert model.opset_imports[""] == 21
    weight = constant_array(parse(LINEAR).graph.initializers["w"]).astype(np.float64)
    w_scale = np.abs(weight).max(axis=0) / 448  # per output channel, the largest magnitude at E4M3's 448
    x_scale = np.abs(samples).max() / float(ml_dtypes.finfo(dtype).max)
    x = np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32) * 3  # 3x past the calibrated range
    expected = (_float8(x / x_scale, dtype) * x_scale) @ (_float8(weight / w_scale) * w_scale)
    got = run(model, {"x": x})[0]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    weights = [v.dtype for v in model.graph.initializers.values() if v.shape == ir.Shape([32, 16])]
    assert weights == [ir.DataType.FLOAT8E4M3FN]  # the weight is stored in 8 bits, not kept float beside them


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt", "portable"])
def test_fp8_on_a_transformer_block_stays_close_to_fp32_and_every_target_takes_it(tmp_path, target):
    path = tmp_path / "block.onnx"
    save_model(synthetic.transformer_block(hidden=64), path)
    reference = qcompile.compile(path, recipe="canonicalize").model
    np.savez(tmp_path / "calib.npz", **random_feed(reference, batch=16, seq=6, seed=1))
    result = qcompile.compile(path, recipe="fp8", calib=str(tmp_path / "calib.npz"), target=target)
    assert {row["precision"] for row in result.report["layers"]} == {
        "w:float8e4m3fn a:float8e4m3fn", "a:float8e4m3fn x a:float8e4m3fn"}
    assert target_problems(result.model, TARGETS[target]) == []
    assert any("ONNX Runtime's CPU has no FP8 kernels" in note for note in result.report["notes"])
    feed = random_feed(reference, batch=2, seq=6)
    assert worst_sqnr_db(run(reference, feed), run(result.model, feed)) > 20  # 3 mantissa bits: ~25 dB here


@pytest.mark.parametrize("target, options, message", [
    ("tensorrt", {"activations": "e5m2"}, "takes FP8 as E4M3 only"),
    ("ort-cpu", {"activations": "int8"}, "expected e4m3 or e5m2"),
    ("ort-cpu", {"calib_method": "entropy"}, "expected one of minmax, percentile for FP8"),
])
def test_fp8_options_it_cannot_take_are_usage_errors(linear, target, options, message):
    path, calib, _ = linear
    with pytest.raises(UsageError, match=message):
        qcompile.compile(path, recipe="fp8", calib=calib, target=target, options=options)


def test_fp8_models_open_in_qcompile_sessions_on_every_supported_runtime(linear):
    """ONNX Runtime before 1.32 refuses FP8 Q/DQ at its default optimization level; qcompile.session opens them at
    the basic level there, so --verify works."""
    path, calib, _ = linear
    result = qcompile.compile(path, recipe="fp8", calib=calib)
    verification = result.verify(calib)
    assert verification["passed"] and verification["outputs"][0]["sqnr_db"] > 25


def test_fp8_without_calibration_data_suggests_the_weight_only_recipes(linear):
    with pytest.raises(UsageError, match="recipe fp8 calibrates.*w4a16-rtn or w4a16-hqq"):
        qcompile.compile(linear[0], recipe="fp8")
