import numpy as np
import pytest
from helpers import apply, clone, op_types, parse, run

from qcompile.passes.fusion.fold_qdq import FoldQDQPass
from qcompile.passes.fusion.fold_qdq import FoldQDQOptions

_HEADER = '<ir_version: 10, opset_import: ["" : 21]>'


def _feed(shape=(2, 3, 4, 6), seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _fold(text, options=FoldQDQOptions()):
    model = parse(text)
    reference = clone(model)
    modified = apply(model, FoldQDQPass(options))
    assert not FoldQDQPass(options)(model).modified  # idempotent
    return model, reference, modified


def test_dequantize_quantize_on_the_same_grid_cancels_exactly():
    model, reference, modified = _fold(f"""{_HEADER}
        g (float[2, 3, 4, 6] x) => (float[2, 3, 4, 6] y) <float s = {{0.05}}, uint8 z = {{128}}> {{
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            q2 = QuantizeLinear(d, s, z)
            y = DequantizeLinear(q2, s, z)
        }}""")

    assert modified
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear"]
    np.testing.assert_array_equal(run(reference, _feed())[0], run(model, _feed())[0])


def test_a_different_grid_is_left_alone():
    model, _, modified = _fold(f"""{_HEADER}
        g (float[2, 3, 4, 6] x) => (float[2, 3, 4, 6] y) <float s = {{0.05}}, uint8 z = {{128}}, float s2 = {{0.07}}> {{
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            q2 = QuantizeLinear(d, s2, z)
            y = DequantizeLinear(q2, s2, z)
        }}""")

    assert not modified
    assert op_types(model).count("QuantizeLinear") == 2


@pytest.mark.parametrize("op, extra, out_shape", [
    ("Reshape(d, shape)", "int64[2] shape = {6, -1}", "[6, 24]"),
    ("Transpose<perm = [0, 2, 3, 1]>(d)", "", "[2, 4, 6, 3]"),
    ("Flatten<axis = 2>(d)", "", "[6, 24]"),
    ("Unsqueeze(d, axes)", "int64[1] axes = {1}", "[2, 1, 3, 4, 6]"),
    ("MaxPool<kernel_shape = [2, 2]>(d)", "", "[2, 3, 3, 5]"),
])
def test_pass_through_ops_move_onto_the_integer_tensor_exactly(op, extra, out_shape):
    constants = "float s = {0.05}, uint8 z = {128}" + (f", {extra}" if extra else "")
    model, reference, modified = _fold(f"""{_HEADER}
        g (float[2, 3, 4, 6] x) => (float{out_shape} y) <{constants}> {{
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            p = {op}
            q2 = QuantizeLinear(p, s, z)
            y = DequantizeLinear(q2, s, z)
        }}""")

    assert modified
    assert op_types(model) == ["QuantizeLinear", op.split("(")[0].split("<")[0], "DequantizeLinear"]  # on uint8
    np.testing.assert_array_equal(run(reference, _feed())[0], run(model, _feed())[0])


def test_per_channel_grid_does_not_move_through_a_transpose():
    model, _, modified = _fold(f"""{_HEADER}
        g (float[2, 3, 4, 6] x) => (float[2, 4, 6, 3] y) <float[3] s = {{0.05, 0.06, 0.07}}, uint8[3] z = {{128, 128, 128}}> {{
            q = QuantizeLinear<axis = 1>(x, s, z)
            d = DequantizeLinear<axis = 1>(q, s, z)
            p = Transpose<perm = [0, 2, 3, 1]>(d)
            q2 = QuantizeLinear<axis = 3>(p, s, z)
            y = DequantizeLinear<axis = 3>(q2, s, z)
        }}""")

    assert not modified
    assert op_types(model).count("QuantizeLinear") == 2


@pytest.mark.parametrize("expression, factor", [("Mul(d, c)", 0.25), ("Mul(c, d)", 3.0), ("Div(d, c)", 4.0)])
def test_positive_constant_scaling_folds_into_the_dequantize_scale(expression, factor):
    model, reference, modified = _fold(f"""{_HEADER}
        g (float[2, 3, 4, 6] x) => (float[2, 3, 4, 6] y) <float s = {{0.05}}, uint8 z = {{128}}, float c = {{{factor}}}> {{
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            y = {expression}
        }}""")

    assert modified
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear"]
    scale = model.graph.node(1).inputs[1].const_value.numpy()
    assert scale == pytest.approx(0.05 * factor if expression.startswith("Mul") else 0.05 / factor)
    np.testing.assert_allclose(run(reference, _feed())[0], run(model, _feed())[0], rtol=1e-6)


@pytest.mark.parametrize("expression", ["Mul(d, c)", "Div(c, d)"])
def test_negative_factor_or_reciprocal_is_left_alone(expression):
    factor = -2.0 if expression.startswith("Mul") else 2.0
    model, _, modified = _fold(f"""{_HEADER}
        g (float[2, 3, 4, 6] x) => (float[2, 3, 4, 6] y) <float s = {{0.05}}, uint8 z = {{128}}, float c = {{{factor}}}> {{
            q = QuantizeLinear(x, s, z)
            d = DequantizeLinear(q, s, z)
            y = {expression}
        }}""")

    assert not modified
    assert len(model.graph) == 3


_DUPLICATES = f"""{_HEADER}
    g (float[2, 3, 4, 6] x) => (float[2, 3, 4, 6] y) <float s = {{0.05}}, uint8 z = {{128}}> {{
        qa = QuantizeLinear(x, s, z)
        da = DequantizeLinear(qa, s, z)
        ra = Relu(da)
        qb = QuantizeLinear(x, s, z)
        db = DequantizeLinear(qb, s, z)
        rb = Sigmoid(db)
        y = Add(ra, rb)
    }}"""


def test_duplicate_quantize_and_dequantize_nodes_on_one_tensor_merge():
    model, reference, modified = _fold(_DUPLICATES)

    assert modified
    assert op_types(model).count("QuantizeLinear") == 1 and op_types(model).count("DequantizeLinear") == 1
    np.testing.assert_array_equal(run(reference, _feed())[0], run(model, _feed())[0])


def test_duplicates_stay_for_targets_that_want_one_per_consumer():
    model, _, modified = _fold(_DUPLICATES, FoldQDQOptions(merge_duplicates=False))

    assert not modified
    assert op_types(model).count("QuantizeLinear") == 2
