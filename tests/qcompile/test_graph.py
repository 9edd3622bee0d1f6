"""IR helpers: the intervals a value's producer keeps it in and its readers can tell apart."""
import numpy as np
from helpers import parse

from qcompile.graph import producer_interval, reader_interval

READERS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x) => (float[4] a, float[4] c, float[4] d) <float lo = {-1}, float hi = {2}> {
    hard = HardSwish(x)
    gate = HardSigmoid<alpha = 0.25, beta = 0.5>(x)
    a = Mul(hard, gate)
    b = Clip(x, lo, hi)
    c = Add(b, b)
    d = Relu(x)
}
"""


def test_each_saturating_reader_alone_and_their_hull():
    model = parse(READERS)
    x = model.graph.inputs[0]
    hard, gate, clip, relu = (node for node in model.graph if node.op_type in ("HardSwish", "HardSigmoid", "Clip",
                                                                                 "Relu"))
    # x is read by all four: below -3 none of them changes (HardSwish -3, HardSigmoid -2, Clip -1, Relu 0);
    # above, HardSwish and Relu go on rising
    assert reader_interval(x) == (-3.0, np.inf)
    for node in (relu, hard, clip):
        node.replace_input_with(0, gate.outputs[0])  # now only the HardSigmoid reads x
    assert reader_interval(x) == (-2.0, 2.0)


def test_a_hardswish_written_out_saturates_below_and_any_other_reader_or_a_graph_output_sees_everything():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y, float[4] c) {
            c = Neg(x)
            gate = HardSigmoid<alpha = 0.16666667, beta = 0.5>(c)
            y = Mul(gate, c)
        }""")
    c = next(node for node in model.graph if node.op_type == "Neg").outputs[0]
    assert reader_interval(c) == (-np.inf, np.inf)  # a graph output: the user reads it all
    model.graph.outputs.pop()
    low, high = reader_interval(c)
    assert np.isclose(low, -3.0) and high == np.inf
    assert reader_interval(model.graph.inputs[0]) == (-np.inf, np.inf)  # read by Neg


def test_the_interval_a_producer_keeps_its_output_in():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] s, float[4] t, float[4] c, float[4] n) <float lo = {-1}, float hi = {2}> {
            s = Sigmoid(x)
            t = Tanh(x)
            c = Clip(x, lo, hi)
            n = Neg(x)
        }""")
    s, t, c, n = (node.outputs[0] for node in model.graph)
    assert [producer_interval(v) for v in (s, t, c, n)] == [(0, 1), (-1, 1), (-1, 2), (-np.inf, np.inf)]
    assert producer_interval(model.graph.inputs[0]) == (-np.inf, np.inf)
