import numpy as np
from helpers import apply, clone, op_types, parse, random_feed, run

from qcompile.passes.canonicalize.fuse_hard_swish import FuseHardSwishPass

HARD_SWISH_AS_TWO_OPS = """
<ir_version: 8, opset_import: ["" : %d]>
g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z) {
    gate = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)
    y = Mul(gate, x)
    other = HardSigmoid <alpha = 0.2, beta = 0.5> (y)
    z = Mul(y, other)
}
"""


def test_x_times_its_hard_sigmoid_becomes_one_hard_swish():
    model = parse(HARD_SWISH_AS_TWO_OPS % 14)
    reference = clone(model)

    assert apply(model, FuseHardSwishPass())

    assert op_types(model) == ["HardSwish", "HardSigmoid", "Mul"]  # another gate's constants stay as they are
    feed = random_feed(model)
    feed["x"] *= 4  # across the clip points at -3 and 3
    for actual, expected in zip(run(model, feed), run(reference, feed)):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    assert not FuseHardSwishPass()(model).modified


def test_before_opset_14_there_is_no_hard_swish():
    assert not apply(parse(HARD_SWISH_AS_TWO_OPS % 13), FuseHardSwishPass())
