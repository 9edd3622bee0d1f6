"""Remove Identity nodes (onnx_ir's pass), keeping graph output names."""
from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common


class EliminateIdentityPass(ir.passes.InPlacePass):
    """Rewire the consumers of each Identity to its input and drop the node."""

    name = "eliminate-identity"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=ir.passes.common.IdentityEliminationPass()(model).modified)
