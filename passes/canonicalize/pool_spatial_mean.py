"""ReduceMean over every spatial axis -> GlobalAveragePool.

torch 2.x exports `adaptive_avg_pool2d(x, 1)` and `x.mean((2, 3))` as a ReduceMean. The op rules know no
ReduceMean, so it stays float, and with it the residual Add and Relu before it: a ResNet-18's last
Conv then had no quantized reader, and `float_islands` left every Conv of the network float, one
reader at a time. As a GlobalAveragePool the head is quantized like any pool's. Exact.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from qcompile.graph import constant_array


def _axes(node: ir.Node) -> list[int] | None:
    """ReduceMean's axes, from its attribute (opset < 18) or its constant input; None where unknown."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant_array(node.inputs[1])
        return None if axes is None else axes.reshape(-1).tolist()
    attribute = node.attributes.get("axes")
    return None if attribute is None else list(attribute.as_ints())


class SpatialMeanToPool(RewriteRuleClassBase):
    """ReduceMean(x, axes = every axis after the channel one) -> GlobalAveragePool(x), then a Squeeze of
    those axes where ReduceMean does not keep them."""

    def pattern(self, op, x):
        return op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])

    def check(self, context, x: ir.Value, mean: ir.Value) -> MatchResult:
        result = MatchResult()
        rank = x.shape.rank() if x.shape is not None else None
        if rank is None or rank < 3:
            return result.fail("the input is not known to have spatial axes (rank >= 3)")
        axes = _axes(mean.producer())
        if axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):
            return result.fail("it does not average every spatial axis, and only those")
        return result

    def rewrite(self, op, x, mean):
        node = mean.producer()
        pooled = op.GlobalAveragePool(x)
        pooled.producer().name = node.name  # the layer keeps its name
        if node.attributes.get_int("keepdims", 1):
            return pooled
        spatial = op.Constant(value=ir.tensor(np.arange(2, x.shape.rank(), dtype=np.int64)))
        return op.Squeeze(pooled, spatial)


rules = RewriteRuleSet([SpatialMeanToPool.rule()])


class PoolSpatialMeanPass(ir.passes.InPlacePass):
    """Rewrite a ReduceMean over every spatial axis as a GlobalAveragePool."""

    name = "pool-spatial-mean"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=bool(rules.apply_to_model(model)))
