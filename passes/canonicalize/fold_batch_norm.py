"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

# onnxscript's rules: they refuse unless weights, bias and BN statistics are constant initializers
# that nothing outside the pattern shares.
rules = RewriteRuleSet(
    [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta."""

    name = "fold-batch-norm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=bool(rules.apply_to_model(model)))
