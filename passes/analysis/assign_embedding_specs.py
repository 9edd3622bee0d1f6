"""Decide how embedding tables (constant data of Gather) are stored: INT8, one scale per row, or 4 bits in
blocks along the row (for ONNX Runtime's GatherBlockQuantized)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.graph import constant_array, name_matches
from qcompile.notes import add_note
from qcompile.decisions import QUANT_SPEC_KEY, symmetric_weight_spec
from qcompile.passes.analysis.assign_block_specs import block_spec


@dataclass(frozen=True)
class EmbeddingSpecOptions:
    exclude: tuple[str, ...] = ()
    # 4-bit blocks of this many values along each row (`lower-gather-block-quantized`); None: INT8 per row
    block_size: int | None = None
    symmetric: bool = True


class AssignEmbeddingSpecsPass(ir.passes.InPlacePass):
    """Attach a symmetric per-row INT8 `QuantSpec` to each float table that only row-Gathers read.

    A gathered row is dequantized with its own scale, so a table whose rows differ in size (position
    embeddings: 15 dB per tensor, 39 dB per row on MiniLM) keeps its precision. The rows never meet an
    integer kernel, so the full INT8 range is safe on every CPU. A table that other ops also read (an
    LM head tied to the embedding) stays float, with a report note.
    """

    name = "assign-embedding-specs"

    def __init__(self, options: EmbeddingSpecOptions = EmbeddingSpecOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type != "Gather" or node.domain != "" or self._excluded(node):
                continue
            table = node.inputs[0]
            array = constant_array(table)
            if array is None or array.dtype != np.float32 or array.ndim != 2 or QUANT_SPEC_KEY in table.meta:
                continue
            if not all(index == 0 and _gathers_rows(user) and not self._excluded(user) for user, index in table.uses()):
                add_note(model, f"{table.name}: embedding table left float, read by other ops than row Gathers")
                continue
            block = self.options.block_size
            if block is not None and array.shape[1] % block == 0:
                table.meta[QUANT_SPEC_KEY] = block_spec(array, 1, block, self.options.symmetric, negative_scales=False)
            else:
                if block is not None:
                    add_note(model, f"{table.name}: embedding table stored as INT8 rows, not 4-bit blocks: its rows "
                             f"of {array.shape[1]} are not a multiple of the block of {block}")
                table.meta[QUANT_SPEC_KEY] = symmetric_weight_spec(array, 0, ir.DataType.INT8, 127)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _excluded(self, node: ir.Node) -> bool:
        return name_matches(node.name, self.options.exclude)


def _gathers_rows(node: ir.Node) -> bool:
    return node.op_type == "Gather" and node.domain == "" and node.attributes.get_int("axis", 0) == 0
