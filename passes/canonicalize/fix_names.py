"""Give every node and value a unique name (onnx_ir's NameFixPass).

Exports may leave nodes unnamed or names repeated; `--exclude` / `[[nodes]]` patterns, the report's
layers, `qcompile eval`'s blame and the calibration runner (which fetches tensors by name) all need
unique names. Existing unique names are kept.
"""
from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common


class FixNamesPass(ir.passes.InPlacePass):
    """Name unnamed nodes and values, and make repeated names unique."""

    name = "fix-names"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=ir.passes.common.NameFixPass()(model).modified)
