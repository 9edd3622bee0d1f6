import numpy as np
import pytest
from helpers import apply, clone, op_types, parse, run

import qcompile
from qcompile.io import save_model
from qcompile.passes.canonicalize.pool_spatial_mean import PoolSpatialMeanPass

# torch 2.x: adaptive_avg_pool2d(x, 1) -> ReduceMean(axes input, keepdims), x.mean((2, 3)) -> keepdims=0
OPSET_18 = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 3, 5, 4] x) => (float[N, 3, 1, 1] kept, float[N, 3] dropped) <int64[2] spatial = {-2, -1},
                                                                         int64[2] also = {3, 2}> {
    kept = ReduceMean<keepdims = 1>(x, spatial)
    dropped = ReduceMean<keepdims = 0>(x, also)
}
"""
OPSET_13 = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 5, 4] x) => (float[N, 3, 1, 1] y) {
    y = ReduceMean<axes = [2, 3]>(x)
}
"""
NOT_SPATIAL = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 3, 5, 4] x, int64[2] given) => (float[N, 1, 5, 4] channels, float[N, 3, 1, 4] rows, float[N, 3] dynamic)
    <int64[1] one = {1}, int64[1] two = {2}> {
    channels = ReduceMean(x, one)
    rows = ReduceMean(x, two)
    dynamic = ReduceMean<keepdims = 0>(x, given)
}
"""


@pytest.mark.parametrize("text", [OPSET_18, OPSET_13])
def test_a_mean_over_every_spatial_axis_becomes_a_global_pool_and_equals_it(text):
    model = parse(text)
    reference = clone(model)

    assert apply(model, PoolSpatialMeanPass())

    assert "ReduceMean" not in op_types(model) and "GlobalAveragePool" in op_types(model)
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)}
    for actual, expected in zip(run(model, x), run(reference, x)):
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    assert not PoolSpatialMeanPass()(model).modified


def test_a_mean_over_channels_over_some_spatial_axes_or_unknown_axes_stays():
    model = parse(NOT_SPATIAL)
    assert not apply(model, PoolSpatialMeanPass())
    assert op_types(model) == ["ReduceMean"] * 3


RESIDUAL_HEAD = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 4, 6, 6] x) => (float[N, 3] y) <float[4, 4, 3, 3] w0 = {W0}, float[4, 4, 3, 3] w1 = {W1},
                                             float[3, 4] fc = {FC}, int64[2] spatial = {2, 3}> {
    c0 = Conv<pads = [1, 1, 1, 1]>(x, w0)
    r0 = Relu(c0)
    c1 = Conv<pads = [1, 1, 1, 1]>(r0, w1)
    sum = Add(c1, x)
    r1 = Relu(sum)
    mean = ReduceMean<keepdims = 0>(r1, spatial)
    y = Gemm<transB = 1>(mean, fc)
}
"""


def test_a_resnet_whose_head_averages_with_reduce_mean_keeps_its_convs_on_integers_with_float_islands(tmp_path):
    rng = np.random.default_rng(0)
    text = RESIDUAL_HEAD
    for name, size in (("W0", 144), ("W1", 144), ("FC", 12)):
        text = text.replace(name, ", ".join(f"{v:.3f}" for v in rng.normal(0, 0.3, size)))
    save_model(parse(text), tmp_path / "in.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 4, 6, 6)).astype(np.float32))

    result = qcompile.compile(tmp_path / "in.onnx", recipe="w8a8", calib=str(tmp_path / "calib.npz"),
                              options={"placement": "float-islands"})

    # the residual Add feeds a quantized pool now, so no Conv is an island (before: both, one after the other)
    assert [layer["precision"] for layer in result.report["layers"]] == ["w:int8 a:uint8"] * 3
