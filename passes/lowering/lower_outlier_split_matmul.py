"""MatMul / Gemm whose weight carries a symmetric INT8 per-output-channel spec -> qcompile's
``ai.qcompile.OutlierSplitMatMul`` (LLM.int8(), `qcompile.ops.outlier_split_matmul`).

The weight is stored as the op takes it: its levels + 128 as uint8, one row of K per output channel, and the
channel scales; the activations' outlier columns are found at run time by ``threshold``. A Gemm's bias follows
as an Add; a weight several layers read is stored once. The model's metadata names the library it needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile import kernels
from qcompile.decisions import QUANT_SPEC_KEY, IntegerGrid, PerAxis, QuantSpec
from qcompile.graph import register_constant
from qcompile.op_rules import reduction_axis
from qcompile.ops import outlier_split_matmul
from qcompile.passes.lowering.lower_matmul_nbits import replace_layer


@dataclass(frozen=True)
class OutlierSplitOptions:
    threshold: float = outlier_split_matmul.DEFAULT_THRESHOLD


def _is_int8_per_channel(spec, axis: int) -> bool:
    """An 8-bit symmetric spec with one scale per output channel (the axis other than K)."""
    return isinstance(spec, QuantSpec) and isinstance(spec.granularity, PerAxis) and spec.granularity.axis != axis \
        and isinstance(spec.grid, IntegerGrid) and spec.grid.bits == 8 and spec.symmetric


class LowerOutlierSplitMatMulPass(ir.passes.InPlacePass):
    """Replace each MatMul / Gemm on an INT8 per-channel weight by an OutlierSplitMatMul (and a Gemm's bias Add)."""

    name = "lower-outlier-split-matmul"

    def __init__(self, options: OutlierSplitOptions = OutlierSplitOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stored: dict[ir.Value, tuple[list[ir.Value], int, int]] = {}  # weight -> its op inputs, K, N
        for node in list(graph):
            axis = reduction_axis(node)
            weight = node.inputs[1] if axis is not None else None
            if weight is None or weight.const_value is None or weight.const_value.numpy().ndim != 2 or \
                    not _is_int8_per_channel(weight.meta.get(QUANT_SPEC_KEY), axis):
                continue
            if weight not in stored:
                stored[weight] = _initializers(graph, weight, axis)
            inputs, k, n = stored[weight]
            replace_layer(graph, node, outlier_split_matmul.OP_TYPE, inputs,
                          {"K": k, "N": n, "threshold": float(self.options.threshold)}, outlier_split_matmul.DOMAIN)
        for weight in stored:
            del weight.meta[QUANT_SPEC_KEY]
            if not weight.uses():
                graph.initializers.pop(weight.name)
        if stored:
            model.opset_imports.setdefault(outlier_split_matmul.DOMAIN, 1)
            op = outlier_split_matmul
            model.metadata_props[kernels.METADATA_KEY] = f"{op.DOMAIN}: {op.OP_TYPE}"
        return ir.passes.PassResult(model, modified=bool(stored))


def _initializers(graph: ir.Graph, weight: ir.Value, axis: int) -> tuple[list[ir.Value], int, int]:
    spec = weight.meta[QUANT_SPEC_KEY]
    levels = spec.quantize(weight.const_value.numpy()).astype(np.int16)
    if axis == 0:  # (K, N) -> one row per output channel
        levels = levels.T
    n, k = levels.shape
    stored = (levels + 128).astype(np.uint8)
    scales = np.asarray(spec.stored_scale(), np.float32).reshape(n)
    return [register_constant(graph, f"{weight.name}_int8", stored),
            register_constant(graph, f"{weight.name}_scales", scales)], k, n
