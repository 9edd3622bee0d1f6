import numpy as np
from helpers import apply, clone, op_types, parse, random_feed, run

from qcompile.passes.canonicalize.fold_conv_affine import FoldConvAffinePass

# paddle2onnx's PP-LCNet block: a bias Add, then a learnable scale and shift, then HardSwish
AFFINE_CHAIN = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[1, 2, 5, 5] x) => (float[1, 3, 5, 5] y)
  <float[3, 2, 3, 3] w = {%s}, float[3] b = {0.5, -1, 2}, float[1, 3, 1, 1] c = {1, 2, 3},
   float[1] s = {-1.5}, float[1] t = {0.25}> {
    conv = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    biased = Add(c, conv)
    scaled = Mul(biased, s)
    shifted = Add(scaled, t)
    y = HardSwish(shifted)
}
""" % ", ".join(str(v) for v in np.linspace(-1, 1, 54).round(3))

NOT_PER_CHANNEL = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z)
  <float[2, 2, 1, 1] w = {1, 2, 3, 4}, float[1, 1, 1, 4] row = {1, 2, 3, 4}, float[2] s = {2, 3}> {
    c1 = Conv(x, w)
    y = Mul(c1, row)
    c2 = Conv(x, w)
    z = Add(c2, c2)
}
"""

SHARED_OUTPUT = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] c)
  <float[2, 2, 1, 1] w = {1, 2, 3, 4}, float[1] s = {2}> {
    c = Conv(x, w)
    y = Mul(c, s)
}
"""


def test_folds_a_bias_scale_and_shift_chain_into_the_conv_and_keeps_its_output():
    model = parse(AFFINE_CHAIN)
    reference = clone(model)

    assert apply(model, FoldConvAffinePass())

    assert op_types(model) == ["Conv", "HardSwish"]
    assert model.graph.node(0).name == reference.graph.node(0).name
    feed = random_feed(model)
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0], rtol=1e-5, atol=1e-5)
    assert not FoldConvAffinePass()(model).modified


def test_folds_into_a_conv_without_bias_and_a_conv_transpose():
    model = parse("""
<ir_version: 10, opset_import: ["" : 18]>
g (float[1, 2, 4, 4] x) => (float[1, 3, 8, 8] y)
  <float[3, 2, 1, 1] w = {1, 2, 3, 4, 5, 6}, float[3, 3, 2, 2] wt = {%s}, float[3, 1, 1] s = {2, -1, 0.5}> {
    c = Conv(x, w)
    m = Mul(c, s)
    r = Relu(m)
    t = ConvTranspose <strides = [2, 2], group = 1> (r, wt)
    y = Add(t, s)
}
""" % ", ".join(str(v) for v in np.linspace(-1, 1, 36).round(3)))
    reference = clone(model)

    assert apply(model, FoldConvAffinePass())

    assert op_types(model) == ["Conv", "Relu", "ConvTranspose"]
    feed = random_feed(model)
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0], rtol=1e-5, atol=1e-5)


def test_leaves_constants_that_vary_along_other_axes_and_adds_of_two_activations():
    model = parse(NOT_PER_CHANNEL)

    assert not apply(model, FoldConvAffinePass())


def test_leaves_a_conv_whose_output_is_read_elsewhere():
    model = parse(SHARED_OUTPUT)

    assert not apply(model, FoldConvAffinePass())
    assert op_types(model) == ["Conv", "Mul"]
