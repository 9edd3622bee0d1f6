"""The FP8 family: `fp8`, FP8 weights and activations as QuantizeLinear / DequantizeLinear (opset 21).

Weights are E4M3FN with one scale per output channel, each channel's largest magnitude mapped to 448;
activations one scale per tensor from calibration (their largest magnitude, or a percentile), E4M3FN or E5M2.
Quantization saturates (QuantizeLinear's saturate=1, the default), never NaN. Layers are chosen as for `w8a8`
(`select-quantized-ops`), biases stay float (FP8 has no integer bias grid). TensorRT fuses E4M3 Q/DQ into FP8
kernels on GPUs that have them; ONNX Runtime's CPU has no FP8 kernels and computes the Q/DQ in float, so the
model is checked there, not sped up.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile.calibration import CalibrationOptions, Method
from qcompile.errors import UsageError
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass, WeightSpecOptions
from qcompile.passes.analysis.calibrate_activations import CalibrateActivationsPass, CalibrateOptions
from qcompile.passes.analysis.select_quantized_ops import SelectOptions, SelectQuantizedOpsPass
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.fusion.fold_qdq import FoldQDQOptions, FoldQDQPass
from qcompile.passes.lowering.insert_qdq import InsertQDQOptions, InsertQDQPass
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.recipes.base import Recipe, Settings, option
from qcompile.recipes.canonical import canonicalize
from qcompile.recipes.embeddings import untie

# FP8 Q/DQ exist from opset 19; the ops Q/DQ folding moves onto quantized tensors (Transpose, ...) take FP8 from 21
FLOAT8_OPSET = 21
ACTIVATION_TYPES = {"e4m3": ir.DataType.FLOAT8E4M3FN, "e5m2": ir.DataType.FLOAT8E5M2}
CALIB_METHODS = ("minmax", "percentile")  # the histogram searches weigh integer levels, not FP8's


@dataclass(frozen=True)
class FP8Options:
    activations: str = option("e4m3", "activation type: e4m3 (E4M3FN, 3 mantissa bits, up to 448) or e5m2 (2 "
                                      "mantissa bits, up to 57344; TensorRT takes e4m3 only)")
    per_channel: bool = option(True, "one weight scale per output channel (false: one per tensor)")
    calib_method: str = option("minmax", f"activation range: {', '.join(CALIB_METHODS)} (of |x|)")
    percentile: float = option(99.999, "calib_method=percentile: the percentile of |x| mapped to the type's largest value")


def _fp8(settings: Settings) -> list[ir.passes.PassBase]:
    options = settings.options
    if options.activations not in ACTIVATION_TYPES:
        raise UsageError(f"option activations: expected e4m3 or e5m2, got {options.activations!r}")
    if options.calib_method not in CALIB_METHODS:
        raise UsageError(f"option calib_method: expected one of {', '.join(CALIB_METHODS)} for FP8, "
                         f"got {options.calib_method!r}")
    activations = ACTIVATION_TYPES[options.activations]
    if settings.target.symmetric_int8_only and activations != ir.DataType.FLOAT8E4M3FN:
        raise UsageError(f"option activations={options.activations}: {settings.target.summary} takes FP8 as E4M3 "
                         f"only; use activations=e4m3")
    data = settings.require_calib("fp8", without_data="w4a16-rtn or w4a16-hqq (weights only)")
    calibration = CalibrationOptions(Method(options.calib_method), percentile=options.percentile)
    weights = WeightSpecOptions(per_channel=options.per_channel, exclude=settings.excluded, nodes=settings.nodes,
                                float8=ir.DataType.FLOAT8E4M3FN)
    return [
        *canonicalize(FLOAT8_OPSET),
        *untie(settings),
        SelectQuantizedOpsPass(SelectOptions(exclude=settings.excluded)),
        CalibrateActivationsPass(CalibrateOptions(data, activations, calibration, nodes=settings.nodes,
                                                  contrib_16bit=settings.target.contrib_ops)),
        AssignWeightSpecsPass(weights),
        QuantizeWeightsPass(),
        InsertQDQPass(InsertQDQOptions(contrib_16bit=settings.target.contrib_ops)),
        FoldQDQPass(FoldQDQOptions(merge_duplicates=settings.target.ort_qdq_layout)),
        EliminateDeadCodePass(),
    ]


RECIPES = [
    Recipe("fp8", "FP8 E4M3 weights (per channel) and activations (per tensor, calibrated) as Q/DQ at opset 21",
           FP8Options, _fp8),
]
