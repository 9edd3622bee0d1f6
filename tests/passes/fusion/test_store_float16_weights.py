import numpy as np
import onnx_ir as ir
from helpers import apply, clone, op_types, parse, random_feed, run

from qcompile.passes.canonicalize.upcast_float16 import UPCAST_FLOAT16_KEY
from qcompile.passes.fusion.store_float16_weights import StoreFloat16WeightsPass

# w: values float16 holds exactly (a float16 model's weight); v: one it does not; s: a Q/DQ scale
WEIGHTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) <float[4, 4] w = {%s}, float[4, 4] v = {%s}, float s = {0.1}, uint8 zp = {128}> {
    q = QuantizeLinear(x, s, zp)
    d = DequantizeLinear(q, s, zp)
    a = MatMul(d, w)
    y = MatMul(a, v)
}
""" % (", ".join(str(v) for v in np.arange(-8, 8) / 4), ", ".join(str(v) for v in np.arange(16) / 3 + 0.1))


def _model(upcast: bool) -> ir.Model:
    model = parse(WEIGHTS)
    if upcast:
        model.meta[UPCAST_FLOAT16_KEY] = True
    return model


def test_weights_float16_holds_exactly_are_stored_in_float16_behind_a_cast():
    model = _model(upcast=True)
    reference = clone(model)

    assert apply(model, StoreFloat16WeightsPass())

    initializers = {name: value.dtype for name, value in model.graph.initializers.items()}
    assert initializers["w.float16"] == ir.DataType.FLOAT16 and "w" not in initializers
    assert initializers["v"] == ir.DataType.FLOAT and initializers["s"] == ir.DataType.FLOAT
    assert op_types(model)[0] == "Cast"
    feed = random_feed(model)
    np.testing.assert_array_equal(run(model, feed)[0], run(reference, feed)[0])
    assert not StoreFloat16WeightsPass()(model).modified


def test_a_model_that_was_float32_is_left_alone():
    assert not apply(_model(upcast=False), StoreFloat16WeightsPass())
