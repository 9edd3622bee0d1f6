"""Shape and type inference over the whole model."""
from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from qcompile.graph import all_nodes
from qcompile.notes import add_note

logger = logging.getLogger(__name__)


def _value_types(model: ir.Model) -> dict[ir.Value, tuple]:
    values = {v: (v.type, v.shape) for v in model.graph.inputs}
    for node in all_nodes(model):
        for v in node.outputs:
            values[v] = (v.type, None if v.shape is None else tuple(str(d) for d in v.shape))
    return values


class InferShapesPass(ir.passes.InPlacePass):
    """Run ONNX shape inference; symbolic dimensions stay symbolic, models over 2 GB work.

    onnx_ir's pass sets the initializers aside while ONNX infers, so the protobuf limit does not bite.
    A model ONNX cannot infer is left as it is, with a note in the report.
    """

    name = "infer-shapes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _value_types(model)
        try:
            ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
            add_note(model, f"shape inference failed, shapes left as declared: {exc}")
            return ir.passes.PassResult(model, modified=False)
        return ir.passes.PassResult(model, modified=_value_types(model) != before)
