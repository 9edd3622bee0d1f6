import numpy as np
from helpers import apply, clone, op_types, parse, run

from qcompile.models import synthetic
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.canonicalize.eliminate_identity import EliminateIdentityPass
from qcompile.passes.canonicalize.fold_constants import FoldConstantsPass
from qcompile.passes.canonicalize.infer_shapes import InferShapesPass

DEAD_AND_IDENTITY = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 4] x) => (float[N, 4] y) <float[4] unused = {1, 2, 3, 4}, float[4] c = {1, 1, 1, 1}> {
    i = Identity(x)
    dead = Mul(i, c)
    two = Constant<value = float {2.0}>()
    three = Add(two, two)
    y = Mul(i, three)
}
"""


def test_identity_dead_code_and_constants_go_and_output_stays():
    model = parse(DEAD_AND_IDENTITY)
    reference = clone(model)

    assert apply(model, EliminateIdentityPass(), FoldConstantsPass(), EliminateDeadCodePass())

    assert op_types(model) == ["Mul"]
    assert "unused" not in model.graph.initializers
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(run(model, {"x": x})[0], run(reference, {"x": x})[0])
    for p in (EliminateIdentityPass(), FoldConstantsPass(), EliminateDeadCodePass()):
        assert not p(model).modified


def test_control_flow_survives_dead_code_elimination():
    model = synthetic.with_if()
    assert not apply(model, EliminateDeadCodePass())
    assert op_types(model) == ["ReduceSum", "Greater", "If", "MatMul"]


def test_infer_shapes_keeps_symbolic_dims_and_reports_modified_once():
    model = synthetic.transformer_block()
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    assert apply(model, InferShapesPass())
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    assert [str(d) for d in softmax.outputs[0].shape] == ["batch", "4", "seq", "seq"]
    assert not InferShapesPass()(model).modified



def test_unnamed_and_repeated_names_are_made_unique_and_named_ones_kept():
    from qcompile.passes.canonicalize.fix_names import FixNamesPass

    model = parse("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] w) { y = Relu(x)  z = Neg(y)  w = Abs(z) }
    """)
    relu, neg, absolute = model.graph
    relu.name, neg.name, absolute.name = "same", "same", None
    assert apply(model, FixNamesPass())
    names = [node.name for node in model.graph]
    assert all(names) and len(set(names)) == 3 and "same" in names
    assert not apply(model, FixNamesPass())
