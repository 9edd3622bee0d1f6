import numpy as np
import onnx_ir as ir
from helpers import apply, clone, parse, run

from qcompile.passes.canonicalize.upcast_float16 import UpcastFloat16Pass, has_float16

# A float16 export: float16 interface, weights and a ConstantOfShape
FLOAT16_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float16[N, 3] x) => (float16[N, 2] y, float16[N, 2] z)
  <float[3, 2] w = {0.5, -1.25, 2, 0.125, -0.75, 1.5}, int64[2] two = {1, 2}> {
    m = MatMul(x, w)
    half = ConstantOfShape <value = float[1] {0.5}> (two)
    y = Add(m, half)
    z = Relu(y)
}
"""

# Keras' mixed_float16 policy: float32 interface, Casts to float16 around the layers, a Loop body in float16
MIXED_PRECISION_LOOP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 4] y)
  <float[4, 4] w = {1, 0, 0, 0, 0, 0.5, 0, 0, 0, 0, 2, 0, 0, 0, 0, -1}, int64 steps = {3}, bool yes = {1}> {
    h = Cast <to = 10> (x)
    final = Loop (steps, yes, h) <body = step (int64 i, bool c, float16[2, 4] state) => (bool c_out, float16[2, 4] next) {
        c_out = Identity(c)
        product = MatMul(state, w)
        next = Tanh(product)
    }>
    y = Cast <to = 1> (final)
}
"""


def _float16_constants(model: ir.Model) -> ir.Model:
    """The text parser reads float16 constants as bit patterns: write them as float and convert here."""
    weight = model.graph.initializers["w"]
    weight.const_value = ir.tensor(weight.const_value.numpy().astype(np.float16), name="w")
    weight.dtype = ir.DataType.FLOAT16
    for node in model.graph:
        if node.op_type == "ConstantOfShape":
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array([0.5], np.float16)))
    return model


def test_a_float16_model_computes_in_float32_behind_its_float16_interface():
    model = _float16_constants(parse(FLOAT16_MODEL))
    reference = clone(model)

    assert apply(model, UpcastFloat16Pass())

    assert [v.dtype for v in (*model.graph.inputs, *model.graph.outputs)] == [ir.DataType.FLOAT16] * 3
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert model.graph.initializers["w"].const_value.dtype == ir.DataType.FLOAT
    feed = {"x": np.random.default_rng(0).standard_normal((4, 3)).astype(np.float16)}
    for actual, expected in zip(run(model, feed), run(reference, feed)):
        assert actual.dtype == np.float16
        np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=2e-3)  # float16 rounding of the reference
    assert not UpcastFloat16Pass()(model).modified


def test_casts_to_float16_and_loop_bodies_become_float32():
    model = _float16_constants(parse(MIXED_PRECISION_LOOP))
    reference = clone(model)

    assert apply(model, UpcastFloat16Pass())

    assert not has_float16(model)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0], rtol=2e-3, atol=2e-3)


def test_a_float32_model_is_left_alone():
    model = parse(FLOAT16_MODEL.replace("float16", "float"))  # the ConstantOfShape stays float
    assert not has_float16(model)
    assert not apply(model, UpcastFloat16Pass())
