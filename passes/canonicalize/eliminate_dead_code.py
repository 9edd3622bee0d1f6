"""Remove nodes whose outputs nothing uses, and initializers nothing reads."""
from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common


class EliminateDeadCodePass(ir.passes.InPlacePass):
    """Dead nodes (in subgraphs too) and unused initializers that are not graph inputs."""

    name = "eliminate-dead-code"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=ir.passes.common.RemoveUnusedNodesPass()(model).modified)
