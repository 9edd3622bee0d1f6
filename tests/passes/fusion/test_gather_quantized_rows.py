import numpy as np
from helpers import apply, clone, op_types, parse, run

from qcompile.notes import notes
from qcompile.passes.analysis.assign_embedding_specs import AssignEmbeddingSpecsPass
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.fusion.gather_quantized_rows import GatherQuantizedRowsPass
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.passes.transform.materialize_transposed_weights import MaterializeTransposedWeightsPass
from qcompile.passes.analysis.assign_embedding_specs import EmbeddingSpecOptions

ROWS, DIM = 50, 8


def _model():
    """A token table read by a Gather, and a tied table read by a Gather and a MatMul (an LM head)."""
    rng = np.random.default_rng(0)
    # Rows of very different sizes: one scale per row matters.
    table = rng.standard_normal((ROWS, DIM)) * np.geomspace(0.01, 10, ROWS)[:, None]
    tied = rng.standard_normal((ROWS, DIM))
    values = lambda a: ", ".join(f"{v:.6f}" for v in a.ravel())  # noqa: E731
    return parse(f"""
        <ir_version: 10, opset_import: ["" : 18]>
        g (int64[2, 7] ids) => (float[2, 7, {DIM}] y, float[2, 7, {ROWS}] logits)
            <float[{ROWS}, {DIM}] table = {{{values(table)}}}, float[{ROWS}, {DIM}] tied = {{{values(tied)}}}> {{
            y = Gather(table, ids)
            h = Gather(tied, ids)
            t = Transpose<perm = [1, 0]>(tied)
            logits = MatMul(h, t)
        }}""")


def _quantize(model, options=EmbeddingSpecOptions()):
    return apply(model, AssignEmbeddingSpecsPass(options), QuantizeWeightsPass(), GatherQuantizedRowsPass(),
                 EliminateDeadCodePass())


def test_embedding_rows_are_gathered_as_int8_and_scaled_per_row():
    model = _model()
    reference = clone(model)

    assert _quantize(model)

    table = model.graph.initializers["table_quantized"].const_value.numpy()
    assert table.dtype == np.int8 and np.abs(table).max() == 127
    assert "DequantizeLinear" not in op_types(model)  # no full-table dequantization at run time
    ids = {"ids": np.random.default_rng(1).integers(0, ROWS, (2, 7))}
    expected, actual = run(reference, ids)[0], run(model, ids)[0]
    row_step = np.abs(expected).max(-1, keepdims=True) / 127
    assert np.all(np.abs(actual - expected) <= row_step / 2 * 1.001)
    assert not GatherQuantizedRowsPass()(model).modified


def test_tied_and_excluded_tables_stay_float():
    model = _model()

    _quantize(model, EmbeddingSpecOptions(exclude=("*",)))
    assert model.graph.initializers["table"].const_value.dtype.name == "FLOAT"

    model = _model()
    _quantize(model)
    assert model.graph.initializers["tied"].const_value.dtype.name == "FLOAT"
    assert any("tied: embedding table left float" in note for note in notes(model))


def test_a_tied_head_gets_its_own_int8_weight_and_the_table_becomes_int8_too():
    model = _model()
    reference = clone(model)

    assert apply(model, MaterializeTransposedWeightsPass(), AssignWeightSpecsPass(), AssignEmbeddingSpecsPass(),
                 QuantizeWeightsPass(), GatherQuantizedRowsPass(), EliminateDeadCodePass())

    assert "Transpose" not in op_types(model)
    tables = [v.const_value for v in model.graph.initializers.values() if v.const_value.size >= ROWS * DIM]
    assert sorted(t.dtype.name for t in tables) == ["INT8", "INT8", "INT8"]  # table, tied rows, head weight
    ids = {"ids": np.random.default_rng(1).integers(0, ROWS, (2, 7))}
    expected, actual = run(reference, ids)[1], run(model, ids)[1]
    assert 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2)) > 30
    assert not MaterializeTransposedWeightsPass()(model).modified
