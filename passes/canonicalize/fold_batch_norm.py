"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common._fuse_batchnorm import (
    FuseBatchNormIntoConv,
    FuseBatchNormIntoConvTranspose,
    FuseBatchNormIntoGemm,
)


class _KeepLayerName:
    """onnxscript's rules, except that the fused node keeps the name of the layer it replaces
    (reports and `qcompile diff` follow layers by name). Their `check` refuses unless weights, bias
    and statistics are constant initializers that nothing outside the pattern shares."""

    def rewrite(self, op, x, inbound_out, batchnorm_out):
        fused = super().rewrite(op, x, inbound_out, batchnorm_out)
        fused.producer().name = inbound_out.producer().name
        return fused


class _Conv(_KeepLayerName, FuseBatchNormIntoConv):
    pass


class _ConvTranspose(_KeepLayerName, FuseBatchNormIntoConvTranspose):
    pass


class _Gemm(_KeepLayerName, FuseBatchNormIntoGemm):
    pass


rules = RewriteRuleSet([_Conv.rule(), _ConvTranspose.rule(), _Gemm.rule()])


class FoldBatchNormPass(ir.passes.InPlacePass):
    """W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta."""

    name = "fold-batch-norm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=bool(rules.apply_to_model(model)))
