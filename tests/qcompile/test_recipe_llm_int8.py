"""`llm-int8`: INT8 per-channel weights on qcompile's OutlierSplitMatMul, checked end to end on ONNX Runtime."""
import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile.errors import UsageError
from qcompile.inspection import describe
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile.ops import outlier_split_matmul
from qcompile.target_check import target_problems
from qcompile.targets import TARGETS
from qcompile.verify import worst_sqnr_db
from tests.helpers import parse, random_feed, run


@pytest.fixture
def block(tmp_path):
    path = tmp_path / "block.onnx"
    save_model(synthetic.transformer_block(), path)
    return path


def test_every_matmul_runs_on_the_outlier_split_op(block, kernels_library):
    model = qcompile.compile(block, recipe="llm-int8").model
    info = describe(model)
    assert info["op_histogram"].get("ai.qcompile::OutlierSplitMatMul", 0) >= 4
    assert info["custom_op_library"] == "ai.qcompile: OutlierSplitMatMul"
    assert {row["precision"] for row in info["layers"] if row["op_type"] == "OutlierSplitMatMul"} == \
        {"w:int8 a:int8-rows+fp32-outliers"}
    feed = random_feed(model)
    expected = run(ir.load(block), feed)
    assert worst_sqnr_db(expected, run(model, feed)) > 30


def _linear(folder, rng: np.random.Generator, k: int, n: int):
    """A saved model of one MatMul on a random (k, n) weight: y = x @ w."""
    weight = ", ".join(f"{v:.4f}" for v in rng.standard_normal(k * n))
    path = folder / "linear.onnx"
    save_model(parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {k}] x) => (float[N, {n}] y) <float[{k}, {n}] w = {{{weight}}}> {{ y = MatMul(x, w) }}"""), path)
    return path


def test_an_outlier_feature_costs_less_than_with_one_scale_per_row(tmp_path, kernels_library):
    rng = np.random.default_rng(3)
    path = _linear(tmp_path, rng, 96, 40)
    x = rng.standard_normal((16, 96)).astype(np.float32)
    x[:, 3] *= 300  # one feature far above the others, as in LLMs' residual streams
    expected = run(ir.load(path), {"x": x})
    split = run(qcompile.compile(path, recipe="llm-int8").model, {"x": x})
    plain = run(qcompile.compile(path, recipe="llm-int8", options={"threshold": 1e9}).model, {"x": x})
    assert worst_sqnr_db(expected, split) > worst_sqnr_db(expected, plain) + 8  # 43 dB against 33 here


@pytest.mark.parametrize("target", ["portable", "tensorrt", "ort-cpu"])
def test_standard_onnx_ops_compute_the_same(block, kernels_library, target):
    custom = qcompile.compile(block, recipe="llm-int8").model
    decomposed = qcompile.compile(block, recipe="llm-int8", target=target, options={"kernel": "decomposed"}).model
    assert "ai.qcompile" not in decomposed.opset_imports and not describe(decomposed)["custom_op_library"]
    assert target_problems(decomposed, TARGETS[target]) == []
    feed = random_feed(custom)
    feed["x"][..., 5] *= 30
    for got, expected in zip(run(decomposed, feed), run(custom, feed), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("target, options, message", [
    ("ort-cpu", {"threshold": 0}, "threshold: expected a positive magnitude"),
    ("ort-cpu", {"kernel": "qnn"}, "kernel: expected one of auto, custom, decomposed"),
    ("tensorrt", {"kernel": "custom"}, "no kernels for TensorRT"),
])
def test_what_it_cannot_do_is_a_usage_error(block, target, options, message):
    with pytest.raises(UsageError, match=message):
        qcompile.compile(block, recipe="llm-int8", target=target, options=options)


def test_without_the_library_it_says_how_to_build_it(block, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UsageError, match=r"not built: run `qcompile kernels build`"):
        qcompile.compile(block, recipe="llm-int8")


@pytest.mark.parametrize("kernel", ["custom", "decomposed"])
def test_outlier_features_fixed_on_calibration_data(tmp_path, kernels_library, kernel):
    rng = np.random.default_rng(4)
    path = _linear(tmp_path, rng, 64, 16)
    calib = rng.standard_normal((32, 64)).astype(np.float32)
    calib[:, [7, 40]] *= 20  # features 7 and 40 pass 6 on the calibration data
    np.savez(tmp_path / "calib.npz", x=calib)
    result = qcompile.compile(path, recipe="llm-int8", calib=str(tmp_path / "calib.npz"),
                              options={"mode": "fixed", "kernel": kernel})
    assert any("2 in all over 1 layer inputs" in note for note in result.report["notes"])
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[:, 7] *= 20
    x[:, 9] *= 20  # an outlier the calibration data did not have: quantized with the rest
    expected_split = {7, 40}
    if kernel == "custom":
        node = next(n for n in result.model.graph if n.op_type == "OutlierSplitMatMul")
        assert set(node.inputs[3].const_value.numpy().tolist()) == expected_split
        reference = outlier_split_matmul.reference(x, node.inputs[1].const_value.numpy(),
                                                   node.inputs[2].const_value.numpy(), [7, 40], K=64, N=16)
        np.testing.assert_allclose(run(result.model, {"x": x})[0], reference, rtol=1e-5, atol=1e-4)
    else:
        custom = qcompile.compile(path, recipe="llm-int8", calib=str(tmp_path / "calib.npz"),
                                  options={"mode": "fixed"}).model
        np.testing.assert_allclose(run(result.model, {"x": x})[0], run(custom, {"x": x})[0], rtol=1e-4, atol=1e-3)


def test_fixed_outlier_features_need_calibration_data(block):
    with pytest.raises(UsageError, match="give --calib DATA .* or use llm-int8 mode=dynamic"):
        qcompile.compile(block, recipe="llm-int8", options={"mode": "fixed"})
