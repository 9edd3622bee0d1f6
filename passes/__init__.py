"""Graph passes, one per module, and the registry of their kebab-case names."""
from __future__ import annotations

import onnx_ir as ir

from qcompile.passes.analysis.assign_bias_specs import AssignBiasSpecsPass
from qcompile.passes.analysis.assign_embedding_specs import AssignEmbeddingSpecsPass
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass
from qcompile.passes.analysis.calibrate_activations import CalibrateActivationsPass
from qcompile.passes.analysis.correct_bias import CorrectBiasPass
from qcompile.passes.analysis.select_quantized_ops import SelectQuantizedOpsPass
from qcompile.passes.analysis.share_clip_grids import ShareClipGridsPass
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.canonicalize.eliminate_identity import EliminateIdentityPass
from qcompile.passes.canonicalize.fold_batch_norm import FoldBatchNormPass
from qcompile.passes.canonicalize.fold_constants import FoldConstantsPass
from qcompile.passes.canonicalize.fuse_matmul_add import FuseMatMulAddPass
from qcompile.passes.canonicalize.infer_shapes import InferShapesPass
from qcompile.passes.canonicalize.upgrade_opset import UpgradeOpsetPass
from qcompile.passes.fusion.fold_qdq import FoldQDQPass
from qcompile.passes.fusion.fuse_dynamic_matmul import FuseDynamicMatMulPass
from qcompile.passes.fusion.gather_quantized_rows import GatherQuantizedRowsPass
from qcompile.passes.fusion.lower_qoperator import LowerQOperatorPass
from qcompile.passes.lowering.equalize_depthwise_inputs import EqualizeDepthwiseInputsPass
from qcompile.passes.lowering.insert_qdq import InsertQDQPass
from qcompile.passes.lowering.materialize_transposed_weights import MaterializeTransposedWeightsPass
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.passes.lowering.smooth_activations import SmoothActivationsPass

ALL_PASSES: tuple[type[ir.passes.PassBase], ...] = (
    UpgradeOpsetPass,
    InferShapesPass,
    FoldConstantsPass,
    EliminateIdentityPass,
    FoldBatchNormPass,
    FuseMatMulAddPass,
    EliminateDeadCodePass,
    MaterializeTransposedWeightsPass,
    EqualizeDepthwiseInputsPass,
    SmoothActivationsPass,
    SelectQuantizedOpsPass,
    CalibrateActivationsPass,
    ShareClipGridsPass,
    AssignWeightSpecsPass,
    AssignEmbeddingSpecsPass,
    CorrectBiasPass,
    AssignBiasSpecsPass,
    QuantizeWeightsPass,
    GatherQuantizedRowsPass,
    InsertQDQPass,
    FoldQDQPass,
    LowerQOperatorPass,
    FuseDynamicMatMulPass,
)
REGISTRY: dict[str, type[ir.passes.PassBase]] = {p.name: p for p in ALL_PASSES}


def summary(pass_type: type[ir.passes.PassBase]) -> str:
    return (pass_type.__doc__ or "").strip().splitlines()[0]
