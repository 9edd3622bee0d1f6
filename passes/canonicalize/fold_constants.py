"""Evaluate subgraphs whose inputs are all constants."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.optimizer import _constant_folding


@dataclass(frozen=True)
class FoldConstantsOptions:
    # Nodes with a larger constant input, or that would create a larger constant, are kept: folding
    # e.g. Transpose(embedding) would store a second copy of a big tensor.
    input_size_limit: int = 1 << 20
    output_size_limit: int = 1 << 20


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold constant subexpressions into initializers (onnxscript's constant folder), within size limits."""

    name = "fold-constants"

    def __init__(self, options: FoldConstantsOptions = FoldConstantsOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=False,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
        )
        return ir.passes.PassResult(model, modified=folder(model).modified)
