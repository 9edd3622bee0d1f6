"""MatMul + Add -> Gemm, where Gemm's rank-2 contract makes that legal."""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet


def _dims(value: ir.Value) -> list | None:
    return None if value.shape is None else list(value.shape)


class MatMulAddToGemm(RewriteRuleClassBase):
    """Add(MatMul(a, b), c) -> Gemm(a, b, c) for rank-2 a and b and a bias c that broadcasts to (M, N)."""

    def pattern(self, op, a, b, c):
        return op.Add(op.MatMul(a, b, _outputs=["product"]), c)

    def check(self, context, a: ir.Value, b: ir.Value, c: ir.Value, product: ir.Value) -> MatchResult:
        result = MatchResult()
        a_dims, b_dims, c_dims = _dims(a), _dims(b), _dims(c)
        if a_dims is None or b_dims is None or c_dims is None:
            return result.fail("a shape is unknown")
        if len(a_dims) != 2 or len(b_dims) != 2:
            return result.fail("Gemm needs rank-2 operands")
        if len(c_dims) > 2:
            return result.fail("the bias has rank > 2, so the Add broadcasts the output up")
        # Unidirectional broadcast of c to (M, N): each dim of c is 1 or equals the output's.
        for c_dim, out_dim in zip(reversed(c_dims), (b_dims[1], a_dims[0])):
            if c_dim != 1 and c_dim != out_dim:
                return result.fail(f"bias dim {c_dim} does not broadcast to output dim {out_dim}")
        if a.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16):
            return result.fail("Gemm is floating point only")
        return result

    def rewrite(self, op, a, b, c, product):
        gemm = op.Gemm(a, b, c)
        gemm.producer().name = product.producer().name  # the layer keeps its name
        return gemm


rules = RewriteRuleSet([MatMulAddToGemm.rule()], commute=True)


class FuseMatMulAddPass(ir.passes.InPlacePass):
    """Fuse a MatMul and the bias Add that follows it into one Gemm."""

    name = "fuse-matmul-add"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=bool(rules.apply_to_model(model)))
