"""QDQ -> QOperator format for ONNX Runtime's CPU kernels (``--option format=qoperator``).

Each integer op replaces the DequantizeLinear -> float op -> QuantizeLinear group around it:

* ``Q(Conv(DQ(x), DQ(w), DQ(b)?)) -> QLinearConv(x, ..., w, ..., y_scale, y_zero_point, b)``,
* ``Q(MatMul(DQ(a), DQ(b))) -> QLinearMatMul``,
* ``Q(Add(DQ(a), DQ(b))) -> com.microsoft.QLinearAdd``,
* ``MatMul(DQ(a), DQ(b))`` with a float output -> ``com.microsoft.MatMulIntegerToFloat``,
* ``Gemm(DQ(a), DQ(b), DQ(c)?)``, with a float output or followed by a Q -> ``com.microsoft.QGemm``,

also across a Relu or Clip between the op and the Q when the Q's own range already lies inside the
Clip's bounds (then saturation to the integer range is the clip). Groups that do not fit (float outputs
of Conv, per-channel activations, a bias not on the x_scale * w_scale grid) stay in
QDQ form, which ONNX Runtime runs as well. The DQ nodes that no longer have readers are left to
dead-code elimination.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from qcompile.graph import clip_bounds, constant_array
from qcompile.passes.fusion.fold_qdq import merge_duplicates
from qcompile.decisions import grid_range, grid_within

ACTIVATIONS = (None, "Relu", "Clip")


def _per_tensor(*scales: ir.Value) -> bool:
    return all(constant_array(s) is not None and constant_array(s).size == 1 for s in scales)


def _check_activation(activated: ir.Value | None, y_scale: ir.Value, y_zero_point: ir.Value,
                      result: MatchResult) -> MatchResult:
    """A Relu / Clip may go if every value the output grid can hold is inside its bounds."""
    if activated is None:
        return result
    scale, zero_point = constant_array(y_scale), constant_array(y_zero_point)
    if scale is None or zero_point is None:
        return result.fail("the output grid is not constant")
    info = np.iinfo(zero_point.dtype)
    grid_lo, grid_hi = grid_range(scale, zero_point, int(info.min), int(info.max))
    bounds = clip_bounds(activated.producer())
    if bounds is None:
        return result.fail("the Clip bounds are not constant")
    if not grid_within((grid_lo, grid_hi), bounds):
        return result.fail(f"the output grid [{grid_lo:.4g}, {grid_hi:.4g}] reaches past the bounds {list(bounds)}")
    return result


def _check_zero_points(result: MatchResult, *zero_points: ir.Value | None) -> MatchResult:
    """Integer kernels take constant 8-bit zero points (not the 16-bit ones of 16-bit activations)."""
    arrays = [constant_array(z) for z in zero_points]
    if any(a is None for a in arrays):
        return result.fail("a zero point is missing or not constant")
    if any(a.dtype not in (np.uint8, np.int8) for a in arrays):
        return result.fail("an input or output is not 8-bit integer")
    return result


def _check_matmul_b(result: MatchResult, b: ir.Value, b_scale: ir.Value, b_dq: ir.Value) -> MatchResult:
    scale = constant_array(b_scale)
    if scale is None or (scale.size > 1 and (
            b.shape is None or b.shape.rank() != 2 or b_dq.producer().attributes.get_int("axis", 1) != 1)):
        return result.fail("b is not quantized per tensor or per column of a 2-D weight")
    return result


class _QLinearRule(RewriteRuleClassBase):
    """Q(activation?(op(DQ(a), DQ(b)))): the shared part of the three rules."""

    op_type = ""

    def __init__(self, activation: str | None):
        super().__init__(name=f"{type(self).__name__}({activation or 'no activation'})")
        self.activation = activation

    def pattern(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
        a_dq = op.DequantizeLinear(a, a_scale, a_zero_point, _outputs=["a_dq"])
        b_dq = op.DequantizeLinear(b, b_scale, b_zero_point, _outputs=["b_dq"])
        y = getattr(op, self.op_type)(a_dq, b_dq, _allow_other_inputs=self.op_type == "Conv", _outputs=["y"])
        if self.activation:
            y = getattr(op, self.activation)(y, _allow_other_inputs=True, _outputs=["activated"])
        return op.QuantizeLinear(y, y_scale, y_zero_point, _outputs=["y_q"])

    def check(self, context, **bound) -> MatchResult:
        result = _check_zero_points(MatchResult(), bound["a_zero_point"], bound["b_zero_point"], bound["y_zero_point"])
        if not result:
            return result
        if not _per_tensor(bound["a_scale"], bound["y_scale"]):
            return result.fail("the input or output is not quantized per tensor")
        result = _check_activation(bound.get("activated"), bound["y_scale"], bound["y_zero_point"], result)
        return self.check_op(result, **bound) if result else result

    def check_op(self, result: MatchResult, **bound) -> MatchResult:
        return result


def _check_integer_bias(result: MatchResult, node: ir.Node, a_scale: ir.Value, w_scale: np.ndarray) -> MatchResult:
    """The bias (input 2), if any, must be INT32 on the a_scale * w_scale grid, behind a DequantizeLinear."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return result
    dq = bias.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].dtype != ir.DataType.INT32:
        return result.fail("the bias is not an INT32 tensor behind a DequantizeLinear")
    bias_scale = constant_array(dq.inputs[1])
    zero_point = constant_array(dq.inputs[2] if len(dq.inputs) > 2 else None)
    expected = constant_array(a_scale) * w_scale
    if bias_scale is None or not np.allclose(bias_scale, expected, rtol=1e-6) or (
            zero_point is not None and np.any(zero_point != 0)):
        return result.fail("the bias is not on the x_scale * w_scale grid with zero point 0")
    return result


def _integer_bias(node: ir.Node) -> list[ir.Value]:
    """The INT32 tensor behind the bias DequantizeLinear, as a list of zero or one inputs."""
    return [node.inputs[2].producer().inputs[0]] if len(node.inputs) > 2 and node.inputs[2] is not None else []


class QLinearConvRule(_QLinearRule):
    op_type = "Conv"

    def check_op(self, result, a_scale, b_scale, b_dq, y, **_) -> MatchResult:
        w_scale = constant_array(b_scale)
        if w_scale is None or (w_scale.size > 1 and b_dq.producer().attributes.get_int("axis", 1) != 0):
            return result.fail("the weight is not quantized per tensor or per output channel")
        return _check_integer_bias(result, y.producer(), a_scale, w_scale)

    def rewrite(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, y, **_):
        conv = y.producer()
        bias = _integer_bias(conv)
        attributes = {name: attr.value for name, attr in conv.attributes.items()}
        out = op.QLinearConv(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, *bias,
                             **attributes)
        out.producer().name = conv.name
        return out


class QLinearMatMulRule(_QLinearRule):
    op_type = "MatMul"

    def check_op(self, result, b, b_scale, b_dq, **_) -> MatchResult:
        return _check_matmul_b(result, b, b_scale, b_dq)

    def rewrite(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, y, **_):
        out = op.QLinearMatMul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)
        out.producer().name = y.producer().name
        return out


class QLinearAddRule(_QLinearRule):
    op_type = "Add"

    def check_op(self, result, b_scale, **_) -> MatchResult:
        return result if _per_tensor(b_scale) else result.fail("b is not quantized per tensor")

    def rewrite(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, y, **_):
        out = op.QLinearAdd(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point,
                            _domain="com.microsoft")
        out.producer().name = y.producer().name
        return out


class MatMulIntegerToFloatRule(RewriteRuleClassBase):
    """MatMul(DQ(a), DQ(b)) with a float output -> com.microsoft.MatMulIntegerToFloat."""

    def pattern(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point):
        a_dq = op.DequantizeLinear(a, a_scale, a_zero_point)
        b_dq = op.DequantizeLinear(b, b_scale, b_zero_point, _outputs=["b_dq"])
        return op.MatMul(a_dq, b_dq, _outputs=["y"])

    def check(self, context, a_scale, a_zero_point, b, b_scale, b_zero_point, b_dq, **_) -> MatchResult:
        result = _check_zero_points(MatchResult(), a_zero_point, b_zero_point)
        if not result:
            return result
        if not _per_tensor(a_scale):
            return result.fail("a is not quantized per tensor")
        return _check_matmul_b(result, b, b_scale, b_dq)

    def rewrite(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y, **_):
        out = op.MatMulIntegerToFloat(a, b, a_scale, b_scale, a_zero_point, b_zero_point, _domain="com.microsoft")
        out.producer().name = y.producer().name
        return out


class _QGemmRule(RewriteRuleClassBase):
    """Gemm(DQ(a), DQ(b), DQ(c)?) -> com.microsoft.QGemm: weights per tensor or per output column, an
    INT32 bias on the a_scale * b_scale grid; see the two subclasses for the output."""

    def gemm(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point):
        a_dq = op.DequantizeLinear(a, a_scale, a_zero_point)
        b_dq = op.DequantizeLinear(b, b_scale, b_zero_point, _outputs=["b_dq"])
        return op.Gemm(a_dq, b_dq, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, a_scale, a_zero_point, b, b_scale, b_zero_point, b_dq, y, **_) -> MatchResult:
        gemm = y.producer()
        result = _check_zero_points(MatchResult(), a_zero_point, b_zero_point)
        if not result:
            return result
        if not _per_tensor(a_scale):
            return result.fail("a is not quantized per tensor")
        if gemm.attributes.get_float("beta", 1.0) != 1.0:
            return result.fail("beta is not 1 (QGemm adds its bias as it is)")
        w_scale = constant_array(b_scale)
        columns_axis = 0 if gemm.attributes.get_int("transB", 0) else 1
        if w_scale is None or (w_scale.size > 1 and b_dq.producer().attributes.get_int("axis", 1) != columns_axis):
            return result.fail("b is not quantized per tensor or per output column")
        return _check_integer_bias(result, gemm, a_scale, w_scale)

    def qgemm(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y, *output_grid):
        gemm = y.producer()
        bias = _integer_bias(gemm) or [None]
        attributes = {name: attr.value for name, attr in gemm.attributes.items() if name != "beta"}
        out = op.QGemm(a, a_scale, a_zero_point, b, b_scale, b_zero_point, *bias, *output_grid,
                       _domain="com.microsoft", **attributes)
        out.producer().name = gemm.name
        return out


class QGemmFloatOutputRule(_QGemmRule):
    def pattern(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point):
        return self.gemm(op, a, a_scale, a_zero_point, b, b_scale, b_zero_point)

    def rewrite(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y, **_):
        return self.qgemm(op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y)


class QGemmQuantizedOutputRule(_QGemmRule):
    def pattern(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
        return op.QuantizeLinear(self.gemm(op, a, a_scale, a_zero_point, b, b_scale, b_zero_point), y_scale,
                                 y_zero_point)

    def check(self, context, y_scale, y_zero_point, **bound) -> MatchResult:
        if not _per_tensor(y_scale) or not _check_zero_points(MatchResult(), y_zero_point):
            return MatchResult().fail("the output is not quantized per tensor with a constant 8-bit zero point")
        return super().check(context, **bound)

    def rewrite(self, op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y, y_scale, y_zero_point, **_):
        return self.qgemm(op, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y, y_scale, y_zero_point)


qlinear_rules = RewriteRuleSet([rule.rule(activation) for rule in (QLinearConvRule, QLinearMatMulRule, QLinearAddRule)
                                for activation in ACTIVATIONS] + [QGemmQuantizedOutputRule.rule()])
# Second, so that a MatMul / Gemm whose output is quantized becomes a QLinearMatMul / QGemm with that grid.
float_output_rules = RewriteRuleSet([MatMulIntegerToFloatRule.rule(), QGemmFloatOutputRule.rule()])


class LowerQOperatorPass(ir.passes.InPlacePass):
    """Replace DQ -> Conv/MatMul/Gemm/Add (-> Relu/Clip) -> Q groups by ONNX Runtime's integer ops
    (QLinearConv, QLinearMatMul, com.microsoft QGemm / QLinearAdd / MatMulIntegerToFloat)."""

    name = "lower-qoperator"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # A pattern may only swallow a DQ that nothing else reads: give each reader its own DQ first,
        # then merge again the copies that stayed.
        _split_shared_dequantize(model.graph)
        modified = bool(qlinear_rules.apply_to_model(model))
        modified = bool(float_output_rules.apply_to_model(model)) or modified
        merge_duplicates(model.graph)
        if modified and "com.microsoft" not in model.opset_imports and any(
                node.domain == "com.microsoft" for node in model.graph):
            model.opset_imports["com.microsoft"] = 1
        return ir.passes.PassResult(model, modified=modified)


def _split_shared_dequantize(graph: ir.Graph) -> None:
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain != "":
            continue
        uses = list(node.outputs[0].uses())
        for user, index in uses[1:]:
            copy = ir.node("DequantizeLinear", list(node.inputs), attributes=dict(node.attributes),
                           name=f"{node.name}_for_{user.name}")
            copy.outputs[0].type, copy.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
            graph.insert_after(node, copy)
            user.replace_input_with(index, copy.outputs[0])
