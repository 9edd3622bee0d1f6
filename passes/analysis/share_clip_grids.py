"""Quantize a Conv's output on the grid of the Relu / Clip after it, where that grid does not hold the clip.

ONNX Runtime runs DQ -> Conv -> Relu/Clip -> Q as an integer QLinearConv only when the Q's grid lies
inside the clip's bounds (its saturation then is the clip). A grid that a Concat partner below zero
widened does not, and the Conv ran in float with its weight dequantized on every call. A Q/DQ on the
Conv's output with the clip's own grid lets it run on integers, and it is exact: on one grid,
rounding then clipping then rounding again gives what clipping then rounding gives.
"""
from __future__ import annotations

import onnx_ir as ir

from qcompile.graph import clip_bounds
from qcompile.op_rules import CLIPS, QUANTIZED_OUTPUT_OPS
from qcompile.decisions import QUANTIZED_INPUTS_KEY
from qcompile.decisions import INTEGER_KERNEL_DTYPES, QUANT_SPEC_KEY, grid_within


class ShareClipGridsPass(ir.passes.InPlacePass):
    """Give a quantized Conv's output the grid of its Relu / Clip where that grid reaches past the clip."""

    name = "share-clip-grids"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type not in QUANTIZED_OUTPUT_OPS or QUANTIZED_INPUTS_KEY not in node.meta:
                continue
            output = node.outputs[0]
            users = list(output.uses())
            if QUANT_SPEC_KEY in output.meta or output.is_graph_output() or len(users) != 1:
                continue
            clip, index = users[0]
            spec = clip.outputs[0].meta.get(QUANT_SPEC_KEY) if clip.op_type in CLIPS and index == 0 else None
            if spec is None or spec.dtype not in INTEGER_KERNEL_DTYPES or spec.axis is not None:
                continue
            bounds = clip_bounds(clip)
            if bounds is None or grid_within(spec.grid_range, bounds):
                continue
            output.meta[QUANT_SPEC_KEY] = spec
            clip.meta[QUANTIZED_INPUTS_KEY] = (0,)
            modified = True
        return ir.passes.PassResult(model, modified=modified)
