"""Gather of an embedding table with a 4-bit block spec along its rows -> ``com.microsoft.GatherBlockQuantized``.

GatherBlockQuantized(data, indices, scales[, zero_points]) gathers rows of ``data`` (INT4 or UINT4, [V, H])
and dequantizes only them: row v's element h is ``(data[v, h] - zero_points[v, h // B]) * scales[v, h // B]``
(no zero points: 0). Attributes: ``block_size`` B, ``gather_axis`` 0, ``quantize_axis`` 1 (the last). The
table is stored at half a byte per value; ONNX Runtime 1.20 runs it on the CPU and CUDA. Standard ONNX's
Gather takes no 4-bit tensors, so the other targets keep INT8 rows (`assign-embedding-specs`).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.decisions import QUANT_SPEC_KEY, PerBlock, QuantSpec
from qcompile.graph import register_constant
from qcompile.passes.lowering.lower_matmul_nbits import CONTRIB_DOMAIN


def _four_bit_row_blocks(spec: object) -> bool:
    """Whether ``spec`` is what GatherBlockQuantized stores: 4-bit levels in blocks along the rows (axis 1)."""
    return (isinstance(spec, QuantSpec) and isinstance(spec.granularity, PerBlock) and spec.granularity.axis == 1
            and spec.grid.bits == 4)


class LowerGatherBlockQuantizedPass(ir.passes.InPlacePass):
    """Replace each row Gather of a table whose spec is 4-bit row blocks by GatherBlockQuantized."""

    name = "lower-gather-block-quantized"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered: dict[ir.Value, tuple[ir.Value, ...]] = {}  # a table several Gathers read is stored once
        for node in list(graph):
            if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
                continue
            table = node.inputs[0]
            spec = table.meta.get(QUANT_SPEC_KEY)
            if not _four_bit_row_blocks(spec) or table.const_value is None:
                continue
            if table not in lowered:
                levels = spec.quantize(table.const_value.numpy())  # INT4 (symmetric) or UINT4 levels
                stored = [register_constant(graph, f"{table.name}_q4", levels),
                          register_constant(graph, f"{table.name}_scales", spec.scale.astype(np.float32))]
                if not spec.symmetric:
                    stored.append(register_constant(graph, f"{table.name}_zero_points", spec.zero_point))
                lowered[table] = tuple(stored)
            data, scales, *zero_points = lowered[table]
            gather = ir.node("GatherBlockQuantized", [data, node.inputs[1], scales, *zero_points],
                             attributes={"block_size": spec.granularity.block_size, "gather_axis": 0,
                                         "quantize_axis": 1},
                             domain=CONTRIB_DOMAIN, name=node.name, outputs=[ir.Value(name=f"{node.name}_rows")])
            gather.outputs[0].type, gather.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
            graph.insert_before(node, gather)
            node.outputs[0].replace_all_uses_with(gather.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
        for table in lowered:
            if not table.uses():
                del graph.initializers[table.name]
        if lowered:
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(lowered))
