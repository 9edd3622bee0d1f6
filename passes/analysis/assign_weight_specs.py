"""Decide how each constant weight of Conv / ConvTranspose / MatMul / Gemm is quantized."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.config import NodeSettings, settings_for
from qcompile.graph import constant_array, has_subgraph, name_matches
from qcompile.notes import add_note
from qcompile.decisions import (FLOAT_REASON_KEY, INTEGER_KERNEL_DTYPES, MAX_BIAS_LEVEL, QUANT_SPEC_KEY,
                                LevelConstraint, float8_weight_spec, symmetric_weight_spec)
from qcompile.op_rules import qdq_missing_note, weight_axis
from qcompile.targets.x86 import CpuProfile

# Per-axis DequantizeLinear (the `axis` attribute) exists from opset 13.
MIN_OPSET_PER_CHANNEL = 13


@dataclass(frozen=True)
class WeightSpecOptions:
    per_channel: bool = True
    # The deployment CPU's integer kernels (`qcompile.targets.x86.CpuProfile`): the stored type, the
    # grid and the pair limit they need. None: full-range INT8 (the weight-only path dequantizes to
    # float before the op, and Q/DQ-semantics targets sum products in 32 bits).
    cpu: CpuProfile | None = None
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
    nodes: tuple[NodeSettings, ...] = ()  # per-node per_channel
    float8: ir.DataType | None = None  # FP8 weights of this type (E4M3FN) instead of INT8


class AssignWeightSpecsPass(ir.passes.InPlacePass):
    """Attach a symmetric 8-bit `QuantSpec` to every float weight initializer that only weighted ops read.

    A weight that anything else also reads (a tied embedding's Gather, say) stays float; so do
    weights inside control-flow subgraphs. Both are noted in the report.
    """

    name = "assign-weight-specs"
    node_settings = ("per_channel",)

    def __init__(self, options: WeightSpecOptions = WeightSpecOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if (missing := qdq_missing_note(model)) is not None:
            add_note(model, missing)
            return ir.passes.PassResult(model, modified=False)
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
            cpu = self.options.cpu
            chosen_axis = axis if per_channel and per_axis_ok else None
            modified = True
            if self.options.float8 is not None:
                weight.meta[QUANT_SPEC_KEY] = float8_weight_spec(array, chosen_axis, self.options.float8)
                continue
            weight.meta[QUANT_SPEC_KEY] = symmetric_weight_spec(
                array, chosen_axis, ir.DataType.UINT8 if cpu and cpu.weight_dtype == "uint8" else ir.DataType.INT8,
                cpu.weight_qmax if cpu else 127, self._constraint(node, array.shape),
                _step_for_bias(node, chosen_axis),
            )
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

    def _constraint(self, node: ir.Node, shape: tuple[int, ...]) -> LevelConstraint | None:
        """What ``node``'s integer kernel on the deployment CPU asks of its weight's levels."""
        x_spec = node.inputs[0].meta.get(QUANT_SPEC_KEY) if node.inputs[0] is not None else None
        if self.options.cpu is None or (x_spec is not None and x_spec.dtype not in INTEGER_KERNEL_DTYPES):
            return None  # the op runs in float
        return self.options.cpu.weight_constraint(node.op_type, shape, node.attributes.get_int("group", 1),
                                                  bool(node.attributes.get_int("transB", 0)))

    def _excluded(self, node: ir.Node) -> bool:
        """Excluded by the user, or left float by placement (`select-quantized-ops`)."""
        return name_matches(node.name, self.options.exclude) or FLOAT_REASON_KEY in node.meta

    def _only_weight_uses(self, weight: ir.Value, axis: int) -> bool:
        return all(
            index == 1 and user.graph is weight.graph and weight_axis(user) == axis and not self._excluded(user)
            and user.op_type in self.options.op_types
            for user, index in weight.uses()
        )


def _step_for_bias(node: ir.Node, axis: int | None) -> np.ndarray | float:
    """The weight step below which the bias of a Conv / Gemm on integer kernels would not fit its INT32
    grid (step = input step x weight step): a channel whose weights are all but zero under a real bias
    (paddle exports have them, at 1e-40) gets a step that makes room for the bias. Its weights round to
    zero either way; the other channels are not affected. A quarter of the grid's room, so that bias
    correction may still move the bias."""
    x_spec = node.inputs[0].meta.get(QUANT_SPEC_KEY) if node.inputs[0] is not None else None
    bias = constant_array(node.inputs[2]) if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 else None
    if x_spec is None or x_spec.dtype not in INTEGER_KERNEL_DTYPES or bias is None or bias.ndim != 1:
        return 0.0
    needed = np.abs(bias).astype(np.float64) / (float(x_spec.scale) * MAX_BIAS_LEVEL / 4)
    return needed if axis is not None and needed.size > 1 else float(needed.max(initial=0.0))
