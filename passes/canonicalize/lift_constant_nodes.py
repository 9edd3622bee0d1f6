"""Constant nodes -> initializers (onnx_ir's pass), so that weights exporters hold in Constant nodes are
weights like any other.

paddle2onnx and some tf2onnx exports keep every weight in a `Constant` node. The analyses that decide
weight grids see them (constant folding gives their outputs a value) but lowering stores only
initializers as integers: such models kept every weight float while their activations got Q/DQ,
bigger and slower than fp32 (issue 19). Every tensor-valued Constant is lifted, in subgraphs too;
`value_ints` and the like (shapes) stay nodes.
"""
from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common


class LiftConstantNodesPass(ir.passes.InPlacePass):
    """Turn each Constant node holding a tensor into an initializer of its graph."""

    name = "lift-constant-nodes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        lift = ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)
        return ir.passes.PassResult(model, modified=lift(model).modified)
