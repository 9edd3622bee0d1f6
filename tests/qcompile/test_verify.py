import numpy as np
import onnx
import onnx_ir as ir

from qcompile.data import InputInfo
from qcompile.verify import latency_feeds, quantized_readers


def test_the_readers_of_a_quantized_tensor_are_found_past_reshapes_and_transposes_not_its_float_readers():
    model = ir.serde.deserialize_model(onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 8] x, float[4, 2] k) => (float[2, 2, 2] y, float[2, 8] z, float[2, 8] f)
          <float s = {0.1}, uint8 zp = {128}, int64[3] shape = {2, 2, 4}> {
            q = QuantizeLinear (x, s, zp)
            d = DequantizeLinear (q, s, zp)
            r = Reshape (d, shape)
            t = Transpose <perm = [1, 0, 2]> (r)
            y = MatMul (t, k)
            z = Relu (d)
            f = Sigmoid (x)
        }"""))
    for node in model.graph:
        node.name = {"MatMul": "attention", "Relu": "relu"}.get(node.op_type, node.op_type)
    assert sorted(quantized_readers(model.graph.inputs[0])) == ["attention", "relu"]  # not the Sigmoid of x itself


def test_latency_is_timed_at_batch_1_and_8_where_the_batch_is_free_and_at_the_fixed_batch_otherwise():
    feed = {"x": np.arange(3 * 2, dtype=np.float32).reshape(3, 2), "ids": np.ones((3, 4), np.int64)}
    free = [InputInfo("x", np.dtype(np.float32), ("N", 2)), InputInfo("ids", np.dtype(np.int64), ("N", 4))]

    feeds, note = latency_feeds(feed, free)

    assert note is None and sorted(feeds) == [1, 8]
    assert feeds[1]["x"].shape == (1, 2) and feeds[8]["ids"].shape == (8, 4)
    np.testing.assert_array_equal(feeds[8]["x"][3:6], feed["x"])  # the samples repeated, not zeros

    fixed = [InputInfo("x", np.dtype(np.float32), (3, 2)), free[1]]
    feeds, note = latency_feeds(feed, fixed)
    assert list(feeds) == [3] and "'x' has no free batch axis (3, 2)" in note


def test_the_share_of_positions_with_the_same_argmax_is_counted_along_the_last_axis():
    from qcompile.verify import OutputAccumulator

    accumulator = OutputAccumulator()
    reference = np.array([[[0.1, 0.9], [0.8, 0.2]], [[0.3, 0.7], [0.6, 0.4]]])  # 2 samples x 2 steps x 2 classes
    candidate = reference.copy()
    candidate[1, 1] = [0.4, 0.6]  # one step's top class flips
    accumulator.add(reference, candidate)
    assert accumulator.result("y").argmax_agreement == 0.75

    single = OutputAccumulator()
    single.add(np.ones((3, 1)), np.ones((3, 1)))  # one value per sample: no argmax to compare
    assert single.result("y").argmax_agreement is None
