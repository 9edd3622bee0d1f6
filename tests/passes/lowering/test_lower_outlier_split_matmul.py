"""INT8 per-channel weights -> OutlierSplitMatMul: the stored levels and scales, MatMul and Gemm layouts, a shared
weight stored once, a Gemm's bias, and the result on ONNX Runtime against the op's reference."""
import numpy as np
from helpers import apply, op_types, parse, run

from qcompile.decisions import QUANT_SPEC_KEY
from qcompile.ops import outlier_split_matmul
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass, WeightSpecOptions
from qcompile.passes.lowering.lower_outlier_split_matmul import LowerOutlierSplitMatMulPass

RNG = np.random.default_rng(2)
W = RNG.standard_normal((48, 6)).astype(np.float32)
MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 48] x) => (float[B, S, 6] y, float[B, S, 6] z, float[B, S, 6] u) <float[48, 6] w = {%s},
                                                                                  float[6, 48] wt = {%s},
                                                                                  float[6] bias = {1, 2, 3, 4, 5, 6}> {
    y = MatMul(x, w)
    z = MatMul(x, w)
    shape = Constant <value = int64[2] {-1, 48}> ()
    x2 = Reshape(x, shape)
    u2 = Gemm <transB = 1> (x2, wt, bias)
    back = Shape(y)
    u = Reshape(u2, back)
}
""" % (", ".join(f"{v:.5f}" for v in W.ravel()), ", ".join(f"{v:.5f}" for v in W.T.ravel()))


def test_matmul_and_gemm_weights_go_to_the_outlier_split_op(kernels_library):
    model = parse(MODEL)
    apply(model, AssignWeightSpecsPass(WeightSpecOptions(op_types=("MatMul", "Gemm"))))
    spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
    levels = spec.quantize(W).astype(np.int16).T  # (N, K)
    assert apply(model, LowerOutlierSplitMatMulPass())
    assert op_types(model).count("OutlierSplitMatMul") == 3 and "Add" in op_types(model)  # the Gemm's bias
    assert model.metadata_props["qcompile.custom_ops"] == "ai.qcompile: OutlierSplitMatMul"
    first = next(n for n in model.graph if n.op_type == "OutlierSplitMatMul")
    np.testing.assert_array_equal(first.inputs[1].const_value.numpy(), (levels + 128).astype(np.uint8))
    np.testing.assert_allclose(first.inputs[2].const_value.numpy(), spec.stored_scale().reshape(6))
    assert "w" not in model.graph.initializers and "wt" not in model.graph.initializers
    assert len([v for v in model.graph.initializers.values() if v.name.endswith("_int8")]) == 2  # w once, wt once
    x = RNG.standard_normal((2, 3, 48)).astype(np.float32)
    x[..., 5] *= 40  # an outlier feature
    y, z, u = run(model, {"x": x})
    expected = outlier_split_matmul.reference(x, first.inputs[1].const_value.numpy(),
                                              first.inputs[2].const_value.numpy(), K=48, N=6)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(y, z)
    np.testing.assert_allclose(u, expected + np.arange(1, 7, dtype=np.float32), rtol=1e-5, atol=1e-4)
    assert not apply(model, LowerOutlierSplitMatMulPass())
