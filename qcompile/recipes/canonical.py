"""The passes every recipe starts with, and the `canonicalize` recipe that runs only them."""
from __future__ import annotations

import onnx_ir as ir

from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.canonicalize.eliminate_identity import EliminateIdentityPass
from qcompile.passes.canonicalize.fold_batch_norm import FoldBatchNormPass
from qcompile.passes.canonicalize.fold_conv_affine import FoldConvAffinePass
from qcompile.passes.canonicalize.fix_names import FixNamesPass
from qcompile.passes.canonicalize.fold_constants import FoldConstantsPass
from qcompile.passes.canonicalize.fuse_matmul_add import FuseMatMulAddPass
from qcompile.passes.canonicalize.infer_shapes import InferShapesPass
from qcompile.passes.canonicalize.lift_constant_nodes import LiftConstantNodesPass
from qcompile.passes.canonicalize.pool_spatial_mean import PoolSpatialMeanPass
from qcompile.passes.canonicalize.upcast_float16 import UpcastFloat16Pass
from qcompile.passes.canonicalize.upgrade_opset import PER_CHANNEL_OPSET, UpgradeOpsetPass
from qcompile.recipes.base import Recipe, Settings


def canonicalize(min_opset: int = PER_CHANNEL_OPSET) -> list[ir.passes.PassBase]:
    """``min_opset``: the opset a model below it is raised to (21 for block-wise DequantizeLinear)."""
    return [
        UpgradeOpsetPass(min_opset),
        LiftConstantNodesPass(),
        UpcastFloat16Pass(),
        FixNamesPass(),
        InferShapesPass(),
        FoldConstantsPass(),
        EliminateIdentityPass(),
        FoldBatchNormPass(),
        FoldConvAffinePass(),
        FuseMatMulAddPass(),
        PoolSpatialMeanPass(),
        EliminateDeadCodePass(),
        InferShapesPass(),
    ]


def _canonicalize(settings: Settings) -> list[ir.passes.PassBase]:
    return canonicalize()


RECIPES = [Recipe("canonicalize", "opset raised to 13 where lower, float16 computed in float32, shape inference, "
                                  "constant folding, BN and per-channel Mul/Add folding into Conv, MatMul+Add->Gemm, "
                                  "spatial ReduceMean->GlobalAveragePool, DCE; no quantization", build=_canonicalize)]
