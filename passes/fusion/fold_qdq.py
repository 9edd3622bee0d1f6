"""Q/DQ cleanup after lowering: drop pairs that cancel, keep pass-through ops on the integer tensor,
fold constant scalings into dequantization scales, merge duplicate Q/DQ nodes on one tensor.

Every rewrite here is exact in real arithmetic (float32 results may differ in the last bit):

* ``Q(DQ(x, s, z), s, z) -> x``: requantizing onto the grid ``x`` already lies on.
* ``Q(P(DQ(x, s, z)), s, z) -> P(x)`` for a pass-through op P (Reshape, Transpose, ...): P only moves
  or selects elements, so it can work on the integers. Per-tensor grids only (a per-channel axis would
  move with P).
* ``Mul(DQ(x, s, z), c) -> DQ(x, s * c, z)`` and ``Div(DQ(x, s, z), c) -> DQ(x, s / c, z)`` for a
  positive constant scalar c.
* Q or DQ nodes that read the same tensor with the same parameters are merged into one (not for
  targets that want one per consumer).

All of it for standard Q/DQ and for ONNX Runtime's com.microsoft ones (16-bit grids below opset 21).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from qcompile.graph import constant_array, graph_values

PASS_THROUGH_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool")
# Standard Q/DQ, and ONNX Runtime's, which carry 16-bit grids below opset 21.
QDQ_DOMAINS = ("", "com.microsoft")


def _grid(node: ir.Node) -> tuple | None:
    """What defines a Q or DQ node's grid: scale, zero point, axis, block size (None unless constant)."""
    scale = constant_array(node.inputs[1])
    zero_point_input = node.inputs[2] if len(node.inputs) > 2 else None
    zero_point = constant_array(zero_point_input)
    if scale is None or (zero_point is None and zero_point_input is not None):
        return None
    per_tensor = scale.size == 1
    axis = None if per_tensor else node.attributes.get_int("axis", 1)
    zero_point_bytes = None if zero_point is None else (zero_point.dtype.str, zero_point.tobytes())
    return (scale.dtype.str, scale.shape, scale.tobytes(), zero_point_bytes, axis,
            node.attributes.get_int("block_size", 0), node.attributes.get_int("saturate", 1))


def _same_grid(dequantize: ir.Node, quantize: ir.Node, result: MatchResult) -> MatchResult:
    dq_grid, q_grid = _grid(dequantize), _grid(quantize)
    if dq_grid is None or q_grid is None:
        return result.fail("a scale or zero point is not a constant")
    # A DQ has no saturate attribute; compare everything else.
    if dq_grid[:-1] != q_grid[:-1]:
        return result.fail("the quantization parameters differ")
    if quantize.outputs[0].dtype != dequantize.inputs[0].dtype:
        return result.fail("the integer types differ")
    return result


class _QDQRule(RewriteRuleClassBase):
    """A rule over the Q/DQ of one domain (`QDQ_DOMAINS`)."""

    def __init__(self, domain: str, detail: str = ""):
        super().__init__(name=f"{type(self).__name__}({', '.join(filter(None, (detail, domain)))})")
        self.domain = domain

    def dequantize(self, op, x, scale, zero_point):
        return op.DequantizeLinear(x, scale, zero_point, _domain=self.domain, _outputs=["dequantized"])

    def quantize(self, op, x, scale, zero_point):
        return op.QuantizeLinear(x, scale, zero_point, _domain=self.domain, _outputs=["requantized"])


class DropDequantizeQuantize(_QDQRule):
    """Q(DQ(x)) on the grid x already lies on is x."""

    def pattern(self, op, x, scale, zero_point, scale2, zero_point2):
        return self.quantize(op, self.dequantize(op, x, scale, zero_point), scale2, zero_point2)

    def check(self, context, dequantized: ir.Value, requantized: ir.Value, **_) -> MatchResult:
        return _same_grid(dequantized.producer(), requantized.producer(), MatchResult())

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class MovePassThroughBeforeDequantize(_QDQRule):
    """Q(P(DQ(x))) with the same per-tensor grid on both sides is P(x)."""

    def __init__(self, op_type: str, domain: str):
        super().__init__(domain, op_type)
        self.op_type = op_type

    def pattern(self, op, x, scale, zero_point, scale2, zero_point2):
        dequantized = self.dequantize(op, x, scale, zero_point)
        moved = getattr(op, self.op_type)(dequantized, _allow_other_inputs=True, _outputs=["moved"])
        return self.quantize(op, moved, scale2, zero_point2)

    def check(self, context, dequantized: ir.Value, moved: ir.Value, requantized: ir.Value, **_) -> MatchResult:
        result = _same_grid(dequantized.producer(), requantized.producer(), MatchResult())
        if result and constant_array(dequantized.producer().inputs[1]).size != 1:
            return result.fail("per-channel grid: its axis would move with the op")
        if result and len(moved.producer().outputs) != 1:
            return result.fail("the op has a second output (MaxPool indices)")
        return result

    def rewrite(self, op, x, moved: ir.Value, **_):
        node = moved.producer()
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        out = getattr(op, self.op_type)(x, *node.inputs[1:], **attributes)
        out.producer().name = node.name
        return out


class FoldScaleIntoDequantize(_QDQRule):
    """Mul(DQ(x, s, z), c) -> DQ(x, s * c, z) (Div: s / c) for a positive constant scalar c."""

    def __init__(self, op_type: str, domain: str):
        super().__init__(domain, op_type)
        self.op_type = op_type

    def pattern(self, op, x, scale, zero_point, factor):
        return getattr(op, self.op_type)(self.dequantize(op, x, scale, zero_point), factor)

    def check(self, context, scale: ir.Value, factor: ir.Value, dequantized: ir.Value, **_) -> MatchResult:
        result = MatchResult()
        c, s = constant_array(factor), constant_array(scale)
        if c is None or c.size != 1 or not np.isfinite(c).all() or not (c > 0).all():
            return result.fail("the factor is not a positive constant scalar")
        if s is None or c.dtype != s.dtype:
            return result.fail("the scale is not a constant of the factor's type")
        if c.ndim > len(dequantized.shape or ()):
            return result.fail("the factor would broadcast the output up")
        return result

    def rewrite(self, op, x, scale: ir.Value, zero_point, factor: ir.Value, dequantized: ir.Value):
        s, c = constant_array(scale), constant_array(factor).reshape(())
        folded = s * c if self.op_type == "Mul" else s / c
        taken, name, i = dequantized.producer().graph.initializers, f"{scale.name}_folded", 1
        while f"{name}_{i}" in taken:
            i += 1
        new_scale = op.initializer(ir.tensor(folded.astype(s.dtype)), name=f"{name}_{i}")
        attributes = {name: attr.value for name, attr in dequantized.producer().attributes.items()}
        return op.DequantizeLinear(x, new_scale, zero_point, _domain=self.domain, **attributes)


rules = RewriteRuleSet(
    [rule for domain in QDQ_DOMAINS for rule in (
        DropDequantizeQuantize.rule(domain),
        *(MovePassThroughBeforeDequantize.rule(op_type, domain) for op_type in PASS_THROUGH_OPS),
        FoldScaleIntoDequantize.rule("Mul", domain), FoldScaleIntoDequantize.rule("Div", domain))],
    commute=True,
)


def merge_duplicates(graph: ir.Graph) -> int:
    """Merge Q (or DQ) nodes that read the same tensor with the same grid; returns how many went."""
    merged = 0
    position = {node: i for i, node in enumerate(graph)}
    for value in graph_values(graph):
        kept: dict[tuple, ir.Node] = {}
        users = {user for user, i in value.uses() if i == 0 and user.graph is graph}
        for user in sorted(users, key=position.__getitem__):  # the first one stays: it precedes all consumers
            if user.op_type not in ("QuantizeLinear", "DequantizeLinear") or user.domain not in QDQ_DOMAINS:
                continue
            grid = _grid(user)
            if grid is None or user.outputs[0].is_graph_output():
                continue
            key = (user.op_type, user.domain, grid, user.outputs[0].dtype)
            if key in kept:
                user.outputs[0].replace_all_uses_with(kept[key].outputs[0])
                graph.remove(user, safe=True)
                merged += 1
            else:
                kept[key] = user
    return merged


@dataclass(frozen=True)
class FoldQDQOptions:
    merge_duplicates: bool = True  # TensorRT wants its own Q/DQ per consumer: False there


class FoldQDQPass(ir.passes.InPlacePass):
    """Drop Q/DQ pairs that cancel, move pass-through ops onto integer tensors, fold constant scalings
    into DQ scales, merge duplicate Q/DQ nodes."""

    name = "fold-qdq"

    def __init__(self, options: FoldQDQOptions = FoldQDQOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        while rules.apply_to_model(model):  # a fold can expose the next one (Q(DQ) after a move)
            ir.passes.common.IdentityEliminationPass()(model)
            modified = True
        if self.options.merge_duplicates and merge_duplicates(model.graph):
            modified = True
        return ir.passes.PassResult(model, modified=modified)
