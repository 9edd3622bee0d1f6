"""Decide how each constant weight of Conv / ConvTranspose / MatMul / Gemm is quantized."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.config import NodeSettings, settings_for
from qcompile.graph import constant_array, has_subgraph, name_matches
from qcompile.notes import add_note
from qcompile.quant_spec import INTEGER_KERNEL_DTYPES, QUANT_SPEC_KEY, symmetric_weight_spec
from qcompile.targets import reduction_axes

# Per-axis DequantizeLinear (the `axis` attribute) exists from opset 13.
MIN_OPSET_PER_CHANNEL = 13


def weight_axis(node: ir.Node) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1), or None if it is not a weighted op."""
    if node.domain != "":
        return None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.shape is None:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul" and weight.shape.rank() >= 2:
        return weight.shape.rank() - 1
    return None


@dataclass(frozen=True)
class WeightSpecOptions:
    per_channel: bool = True
    # The stored type and grid (see `qcompile.targets`); the weight-only path dequantizes to float
    # before the op, so it never meets integer kernels and takes the defaults.
    dtype: ir.DataType = ir.DataType.INT8
    qmax: int = 127
    # Integer kernels that add products in pairs in 16 bits (`qcompile.targets.limit_pairs`); None: no limit.
    pair_limit: int | None = None
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    nodes: tuple[NodeSettings, ...] = ()  # per-node per_channel


class AssignWeightSpecsPass(ir.passes.InPlacePass):
    """Attach a symmetric 8-bit `QuantSpec` to every float weight initializer that only weighted ops read.

    A weight that anything else also reads (a tied embedding's Gather, say) stays float; so do
    weights inside control-flow subgraphs. Both are noted in the report.
    """

    name = "assign-weight-specs"

    def __init__(self, options: WeightSpecOptions = WeightSpecOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        per_axis_ok = model.opset_imports.get("", 0) >= MIN_OPSET_PER_CHANNEL
        modified = False
        in_subgraphs = per_tensor_for_opset = 0
        other_ops: Counter[str] = Counter()
        for node in model.graph:
            if has_subgraph(node):
                in_subgraphs += 1
            axis = weight_axis(node)
            if axis is None or self._excluded(node):
                continue
            weight = node.inputs[1]
            array = constant_array(weight)
            if array is None or array.dtype != np.float32 or QUANT_SPEC_KEY in weight.meta:
                continue
            if node.op_type not in self.options.op_types:
                other_ops[node.op_type] += 1
                continue
            if not self._only_weight_uses(weight, axis):
                add_note(model, f"{weight.name}: left float, read by other ops than weighted ops on the same axis")
                continue
            per_channel = settings_for(self.options.nodes, node.name).get("per_channel", self.options.per_channel)
            per_tensor_for_opset += per_channel and not per_axis_ok
            weight.meta[QUANT_SPEC_KEY] = symmetric_weight_spec(
                array, axis if per_channel and per_axis_ok else None, self.options.dtype, self.options.qmax,
                *self._pair_limit(node, array.shape),
            )
            modified = True
        if other_ops:
            add_note(model, f"{sum(other_ops.values())} layers left float "
                     f"({', '.join(f'{n} {op}' for op, n in sorted(other_ops.items()))}): this recipe quantizes "
                     f"the weights of {' and '.join(self.options.op_types)} only")
        if per_tensor_for_opset:
            add_note(model, f"{per_tensor_for_opset} weights per tensor, not per channel: opset "
                     f"{model.opset_imports.get('', 0)} has no per-channel DequantizeLinear (opset "
                     f"{MIN_OPSET_PER_CHANNEL} has)")
        if in_subgraphs:
            add_note(model, f"{in_subgraphs} control-flow node(s): weights inside their subgraphs left float")
        return ir.passes.PassResult(model, modified=modified)

    def _pair_limit(self, node: ir.Node, shape: tuple[int, ...]) -> tuple[int | None, tuple[int, ...]]:
        """The pair limit and the reduction order of ``node``'s integer kernel, where it adds pairs."""
        x_spec = node.inputs[0].meta.get(QUANT_SPEC_KEY) if node.inputs[0] is not None else None
        if x_spec is not None and x_spec.dtype not in INTEGER_KERNEL_DTYPES:
            return None, ()  # the op runs in float
        axes = reduction_axes(node.op_type, shape, node.attributes.get_int("group", 1),
                              bool(node.attributes.get_int("transB", 0)))
        if self.options.pair_limit is None or axes is None:
            return None, ()
        return self.options.pair_limit, axes

    def _excluded(self, node: ir.Node) -> bool:
        return name_matches(node.name, self.options.exclude)

    def _only_weight_uses(self, weight: ir.Value, axis: int) -> bool:
        return all(
            index == 1 and user.graph is weight.graph and weight_axis(user) == axis and not self._excluded(user)
            and user.op_type in self.options.op_types
            for user, index in weight.uses()
        )
