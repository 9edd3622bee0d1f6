"""MatMul / Gemm on an INT8 weight -> activations quantized at run time (w8a8-dynamic).

Matches ``MatMul(x, DequantizeLinear(w_q, scale, zero_point))`` (plus a following bias ``Add``, or
a Gemm's bias) whose weight is a constant INT8 tensor quantized per tensor or per output column, and
rewrites it to

* ONNX Runtime's ``com.microsoft.DynamicQuantizeMatMul`` (``contrib=True``, the ort-cpu lowering), or
* standard ops: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` (portable).

With ``contrib=True``, matmuls that read the same activation (a transformer's Q/K/V projections) then
share one ``DynamicQuantizeLinear`` and become ``com.microsoft.MatMulIntegerToFloat``: the activation is
quantized once instead of once per matmul, with the same numbers.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from qcompile.graph import constant_array


def _check_weight(weight_q: ir.Value, scale: ir.Value, dequantize: ir.Value, column_axis: int) -> MatchResult:
    result = MatchResult()
    q = constant_array(weight_q)
    if q is None or q.dtype not in (np.int8, np.uint8) or q.ndim != 2:
        return result.fail("the weight is not a constant 2-D 8-bit tensor")
    s = constant_array(scale)
    axis = dequantize.producer().attributes.get_int("axis", 1)
    if s is None or (s.ndim == 1 and axis != column_axis):
        return result.fail("the weight is not quantized per tensor or per output column")
    return result


def _check_bias(bias: ir.Value | None, columns: int) -> MatchResult:
    result = MatchResult()
    b = constant_array(bias) if bias is not None else None
    if bias is not None and (b is None or b.shape != (columns,)):
        return result.fail("the bias is not a constant vector over the output columns")
    return result


class _Lowering(RewriteRuleClassBase):
    """Emits the run-time quantized matmul, in ONNX Runtime's contrib op or in standard ops."""

    def __init__(self, contrib: bool):
        super().__init__(name=f"{type(self).__name__}({'contrib' if contrib else 'standard ops'})")
        self.contrib = contrib

    def emit(self, op, x, weight_q, scale, zero_point, bias, name):
        if self.contrib:
            inputs = [x, weight_q, scale, zero_point] + ([bias] if bias is not None else [])
            out = op.DynamicQuantizeMatMul(*inputs, _domain="com.microsoft")
            out.producer().name = name
            return out
        x_q, x_scale, x_zero_point = op.DynamicQuantizeLinear(x, _outputs=3)
        product = op.MatMulInteger(x_q, weight_q, x_zero_point, zero_point)
        product.producer().name = name  # the layer keeps its name on the op that does its work
        out = op.Mul(op.Cast(product, to=ir.DataType.FLOAT), op.Mul(x_scale, scale))
        return op.Add(out, bias) if bias is not None else out


class MatMulDequantizedWeight(_Lowering):
    def pattern(self, op, x, weight_q, scale, zero_point):
        w = op.DequantizeLinear(weight_q, scale, zero_point, _outputs=["weight"])
        return op.MatMul(x, w, _outputs=["product"])

    def check(self, context, x, weight_q, scale, zero_point, weight, product) -> MatchResult:
        return _check_weight(weight_q, scale, weight, column_axis=1)

    def rewrite(self, op, x, weight_q, scale, zero_point, weight, product):
        return self.emit(op, x, weight_q, scale, zero_point, None, product.producer().name)


class MatMulAddDequantizedWeight(MatMulDequantizedWeight):
    def pattern(self, op, x, weight_q, scale, zero_point, bias):
        return op.Add(super().pattern(op, x, weight_q, scale, zero_point), bias)

    def check(self, context, x, weight_q, scale, zero_point, weight, product, bias) -> MatchResult:
        result = super().check(context, x, weight_q, scale, zero_point, weight, product)
        return result if not result else _check_bias(bias, weight_q.shape[1])

    def rewrite(self, op, x, weight_q, scale, zero_point, weight, product, bias):
        return self.emit(op, x, weight_q, scale, zero_point, bias, product.producer().name)


class GemmDequantizedWeight(_Lowering):
    """Gemm(x, DQ(w), c) with alpha = beta = 1 and no transA; transB is undone on the INT8 weight."""

    def pattern(self, op, x, weight_q, scale, zero_point, bias):
        w = op.DequantizeLinear(weight_q, scale, zero_point, _outputs=["weight"])
        return op.Gemm(x, w, bias, _outputs=["product"])

    def check(self, context, x, weight_q, scale, zero_point, weight, product, bias) -> MatchResult:
        gemm = product.producer()
        if gemm.attributes.get_int("transA", 0) or gemm.attributes.get_float("alpha", 1.0) != 1.0 \
                or gemm.attributes.get_float("beta", 1.0) != 1.0:
            return MatchResult().fail("Gemm with transA, alpha or beta")
        trans_b = gemm.attributes.get_int("transB", 0)
        result = _check_weight(weight_q, scale, weight, column_axis=0 if trans_b else 1)
        return result if not result else _check_bias(bias, weight_q.shape[0 if trans_b else 1])

    def rewrite(self, op, x, weight_q, scale, zero_point, weight, product, bias):
        gemm = product.producer()
        if gemm.attributes.get_int("transB", 0):
            transposed = np.ascontiguousarray(constant_array(weight_q).T)
            weight_q = op.initializer(ir.tensor(transposed), name=f"{weight_q.name}_transposed")
        return self.emit(op, x, weight_q, scale, zero_point, bias, gemm.name)


def rules(contrib: bool) -> list[RewriteRuleSet]:
    """Two rounds: the rewriter visits nodes in order, so a bare-MatMul rule in the first round would take
    each MatMul before the rule rooted at its bias Add got to see it."""
    return [RewriteRuleSet([MatMulAddDequantizedWeight.rule(contrib), GemmDequantizedWeight.rule(contrib)],
                           commute=True),
            RewriteRuleSet([MatMulDequantizedWeight.rule(contrib)])]


def share_input_quantization(graph: ir.Graph) -> bool:
    """DynamicQuantizeMatMul nodes reading one activation -> one DynamicQuantizeLinear feeding a
    MatMulIntegerToFloat per node."""
    readers: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "DynamicQuantizeMatMul" and node.domain == "com.microsoft":
            readers.setdefault(node.inputs[0], []).append(node)
    modified = False
    for x, nodes in readers.items():
        if len(nodes) < 2:
            continue
        quantize = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{nodes[0].name}_shared_quantize")
        graph.insert_before(nodes[0], quantize)
        x_q, x_scale, x_zero_point = quantize.outputs
        x_q.dtype, x_q.shape = ir.DataType.UINT8, x.shape
        x_scale.dtype, x_scale.shape = ir.DataType.FLOAT, ir.Shape([])
        x_zero_point.dtype, x_zero_point.shape = ir.DataType.UINT8, ir.Shape([])
        for node in nodes:
            weight_q, scale, zero_point, *bias = node.inputs[1:]
            matmul = ir.node("MatMulIntegerToFloat", [x_q, weight_q, x_scale, scale, x_zero_point, zero_point, *bias],
                             domain="com.microsoft", name=node.name)
            graph.insert_before(node, matmul)
            output, replacement = node.outputs[0], matmul.outputs[0]
            replacement.type, replacement.shape = output.type, output.shape
            output.replace_all_uses_with(replacement, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            replacement.name = output.name
        modified = True
    return modified


class FuseDynamicMatMulPass(ir.passes.InPlacePass):
    """Rewrite MatMul/Gemm on dequantized INT8 weights to quantize their activations at run time."""

    name = "fuse-dynamic-matmul"

    def __init__(self, contrib: bool = True):
        super().__init__()
        self.contrib = contrib
        self.rules = rules(contrib)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for rule_set in self.rules:
            modified = bool(rule_set.apply_to_model(model)) or modified
        if self.contrib:
            modified = share_input_quantization(model.graph) or modified
        return ir.passes.PassResult(model, modified=modified)
