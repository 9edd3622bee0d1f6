import numpy as np
from helpers import apply, clone, op_types, parse, random_feed, run

from qcompile.models import synthetic
from qcompile.passes.canonicalize.fold_batch_norm import FoldBatchNormPass

CONV_BN_SHARED_OUTPUT = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] c) 
  <float[2, 2, 1, 1] w = {1, 2, 3, 4}, float[2] s = {1, 2}, float[2] b = {0, 1}, float[2] m = {0.5, 0}, float[2] v = {1, 4}> {
    c = Conv(x, w)
    y = BatchNormalization(c, s, b, m, v)
}
"""


def test_folds_every_batch_norm_of_the_cnn_and_keeps_its_output():
    model = synthetic.cnn()
    reference = clone(model)

    assert apply(model, FoldBatchNormPass())

    assert "BatchNormalization" not in op_types(model)
    assert op_types(model).count("Conv") == 3
    feed = random_feed(model)
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0], rtol=1e-4, atol=1e-5)
    assert not FoldBatchNormPass()(model).modified


def test_leaves_conv_whose_output_is_also_used_elsewhere():
    model = parse(CONV_BN_SHARED_OUTPUT)

    assert not apply(model, FoldBatchNormPass())
    assert op_types(model) == ["Conv", "BatchNormalization"]
