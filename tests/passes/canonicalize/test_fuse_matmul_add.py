import numpy as np
from helpers import apply, clone, op_types, parse, random_feed, run

from qcompile.models import synthetic
from qcompile.passes.canonicalize.fuse_matmul_add import FuseMatMulAddPass

RANK3 = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2, 3, 4] x) => (float[2, 3, 2] y) <float[4, 2] w = {1, 2, 3, 4, 5, 6, 7, 8}, float[2] b = {1, -1}> {
    t = MatMul(x, w)
    y = Add(t, b)
}
"""

BIAS_FIRST_AND_SHARED = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[3, 4] x) => (float[3, 2] y, float[3, 2] t) <float[4, 2] w = {1, 2, 3, 4, 5, 6, 7, 8}, float[2] b = {1, -1}> {
    t = MatMul(x, w)
    y = Add(b, t)
}
"""


def test_fuses_rank2_matmul_and_bias_into_gemm():
    model = synthetic.mlp()
    reference = clone(model)

    assert apply(model, FuseMatMulAddPass())

    assert op_types(model) == ["Gemm", "Relu"] * 3 + ["MatMul"]
    feed = random_feed(model, batch=3)
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0], rtol=1e-5, atol=1e-5)
    assert not FuseMatMulAddPass()(model).modified


def test_bias_on_the_left_is_fused_too():
    model = parse(BIAS_FIRST_AND_SHARED.replace(", float[3, 2] t)", ")"))
    reference = clone(model)
    assert apply(model, FuseMatMulAddPass())
    assert op_types(model) == ["Gemm"]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], run(reference, {"x": x})[0], rtol=1e-5)


def test_refuses_rank3_activations_and_a_matmul_output_used_elsewhere():
    for text in (RANK3, BIAS_FIRST_AND_SHARED):
        model = parse(text)
        assert not apply(model, FuseMatMulAddPass())
        assert op_types(model) == ["MatMul", "Add"]
