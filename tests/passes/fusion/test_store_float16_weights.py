import numpy as np
import onnx_ir as ir
from helpers import apply, clone, op_types, parse, random_feed, run

from qcompile.passes.canonicalize.upcast_float16 import UPCAST_FLOAT16_KEY
from qcompile.passes.fusion.store_float16_weights import StoreFloat16WeightsPass

# w: values float16 holds exactly (a float16 model's weight); v: ones it rounds (BatchNorm folded into it);
# big: one beyond float16's range; s: a Q/DQ scale
WEIGHTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y)
    <float[4, 4] w = {%s}, float[4, 4] v = {%s}, float[4, 4] big = {%s}, float s = {0.1}, uint8 zp = {128}> {
    q = QuantizeLinear(x, s, zp)
    d = DequantizeLinear(q, s, zp)
    a = MatMul(d, w)
    b = MatMul(a, v)
    y = MatMul(b, big)
}
""" % (", ".join(str(v) for v in np.arange(-8, 8) / 4), ", ".join(str(v) for v in np.arange(16) / 3 + 0.1),
       ", ".join(str(v) for v in np.arange(16) * 1e4 + 1e-3))


def _model(upcast: bool) -> ir.Model:
    model = parse(WEIGHTS)
    if upcast:
        model.meta[UPCAST_FLOAT16_KEY] = True
    return model


def test_weights_are_stored_in_float16_behind_a_cast_exactly_or_rounded_as_float16_holds_them():
    model = _model(upcast=True)
    reference = clone(model)

    assert apply(model, StoreFloat16WeightsPass())

    initializers = {name: value.dtype for name, value in model.graph.initializers.items()}
    assert initializers["w.float16"] == initializers["v.float16"] == ir.DataType.FLOAT16
    assert "w" not in initializers and "v" not in initializers
    assert initializers["big"] == initializers["s"] == ir.DataType.FLOAT  # beyond 65504; a Q/DQ scale
    assert op_types(model)[:2] == ["Cast", "Cast"]
    stored = model.graph.initializers["v.float16"].const_value.numpy()
    v = np.arange(16).reshape(4, 4) / 3 + 0.1
    np.testing.assert_allclose(stored, v, rtol=2.0**-11)
    feed = random_feed(model)
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0], rtol=2e-3)
    assert not StoreFloat16WeightsPass()(model).modified


def test_a_model_that_was_float32_is_left_alone():
    assert not apply(_model(upcast=False), StoreFloat16WeightsPass())


def test_a_weight_float16_flushes_a_few_tiny_values_of_is_stored_so_one_all_of_tiny_values_is_not():
    few_tiny = ", ".join(["0.5"] * 14 + ["1e-14", "4e-44"])
    all_tiny = ", ".join(["1e-9"] * 16)
    model = parse(f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) <float[4, 4] w = {{{few_tiny}}}, float[4, 4] v = {{{all_tiny}}}> {{
    a = MatMul(x, w)
    y = MatMul(a, v)
}}""")
    model.meta[UPCAST_FLOAT16_KEY] = True

    apply(model, StoreFloat16WeightsPass())

    initializers = model.graph.initializers
    assert "w.float16" in initializers and "w" not in initializers
    assert initializers["v"].dtype == ir.DataType.FLOAT  # all of it would be flushed to zero
