import onnx_ir as ir
import pytest

from qcompile.models import synthetic
from qcompile.decisions.keys import CHANGED_BY, CREATED_BY
from qcompile.pipeline import Pipeline
from qcompile.recipes import Settings, get_recipe


class _DanglingInputPass(ir.passes.InPlacePass):
    """Breaks the graph: a node reads a value nothing defines."""

    name = "break-graph"

    def call(self, model):
        node = next(iter(model.graph))
        node.replace_input_with(0, ir.Value(name="nowhere"))
        return ir.passes.PassResult(model, modified=True)


def test_verify_each_stops_at_the_pass_that_broke_the_graph():
    with pytest.raises(ir.passes.InvariantError, match="after pass break-graph: node 'fc0' .* reads 'nowhere'"):
        Pipeline([_DanglingInputPass()], verify_each=True).run(synthetic.mlp())


def test_records_time_modified_and_provenance_for_every_pass():
    model = synthetic.cnn()
    passes = get_recipe("w8a16").build(Settings(options=get_recipe("w8a16").resolve_options({})))

    records = Pipeline(passes, verify_each=True).run(model)

    assert [r.name for r in records] == [p.name for p in passes]
    assert all(r.seconds >= 0 for r in records)
    modified = {r.name for r in records if r.modified}
    assert {"fold-batch-norm", "assign-weight-specs", "quantize-weights"} <= modified
    dequantizers = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert dequantizers and all(n.metadata_props[CREATED_BY] == "quantize-weights" for n in dequantizers)
    classifier = next(n for n in model.graph if n.name == "classifier")
    assert CREATED_BY not in classifier.metadata_props
    assert classifier.metadata_props[CHANGED_BY] == "quantize-weights"


def test_a_recipe_is_idempotent_on_its_own_output():
    model = synthetic.transformer_block()
    passes = get_recipe("w8a16").build(Settings(options=get_recipe("w8a16").resolve_options({})))
    Pipeline(passes).run(model)
    again = Pipeline(get_recipe("w8a16").build(Settings(options=get_recipe("w8a16").resolve_options({})))).run(model)
    assert not any(r.modified for r in again)
