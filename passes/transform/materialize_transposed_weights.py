"""MatMul(x, Transpose(W)) over a constant W -> MatMul(x, W^T) with W^T stored, so it can be quantized.

Tied LM heads read the embedding table through a Transpose (SmolLM2: 49152 x 576, a fifth of the
model's multiply-adds). Constant folding keeps that Transpose, so as not to store a second float copy;
in a quantizing recipe the copy is stored as INT8 (and the embedding table too, once only Gathers
read it), which is smaller than the one float table was.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile.graph import constant_array, name_matches, register_constant


@dataclass(frozen=True)
class MaterializeOptions:
    exclude: tuple[str, ...] = ()  # MatMuls that stay float: no copy for them


class MaterializeTransposedWeightsPass(ir.passes.InPlacePass):
    """Store the transpose of a constant 2-D table that (quantized) MatMuls read as their weight."""

    name = "materialize-transposed-weights"

    def __init__(self, options: MaterializeOptions = MaterializeOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain != "":
                continue
            table = constant_array(node.inputs[0])
            output = node.outputs[0]
            perm = node.attributes.get_ints("perm", [1, 0])
            if table is None or table.ndim != 2 or list(perm) != [1, 0] or output.is_graph_output():
                continue
            if not all(user.op_type == "MatMul" and user.domain == "" and index == 1 and not self._excluded(user)
                       for user, index in output.uses()):
                continue
            transposed = register_constant(graph, f"{node.inputs[0].name}_transposed", table.T.copy())
            output.replace_all_uses_with(transposed)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _excluded(self, node: ir.Node) -> bool:
        return name_matches(node.name, self.options.exclude)
