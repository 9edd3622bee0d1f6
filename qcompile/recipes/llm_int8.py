"""`llm-int8`: LLM.int8() (Dettmers et al. 2022). Every MatMul / Gemm weight INT8, symmetric, one scale per output
channel; at run time the input features whose magnitude passes ``threshold`` (the outliers, which in LLMs are a
few features thousands of times the median's) are multiplied in float, the rest quantized per row to INT8 and
multiplied on integer instructions: qcompile's `OutlierSplitMatMul` (``kernel=custom``, ort-cpu), or the same
arithmetic in standard ONNX ops (``kernel=decomposed``: portable, TensorRT, and ort-cuda until the library has
CUDA kernels; far slower). Embedding tables INT8 rows, as in the other recipes. No calibration data.

``mode=fixed`` (needs ``--calib``) fixes each layer's outlier features on the calibration data instead of
finding them in every call (`choose-outlier-columns`).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile import kernels
from qcompile.errors import UsageError
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass, WeightSpecOptions
from qcompile.passes.analysis.choose_outlier_columns import ChooseOutlierColumnsPass, OutlierColumnsOptions
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.canonicalize.upgrade_opset import PER_CHANNEL_OPSET
from qcompile.passes.lowering.lower_outlier_split_matmul import LowerOutlierSplitMatMulPass, OutlierSplitOptions
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.recipes.base import Recipe, Settings, option
from qcompile.recipes.canonical import canonicalize
from qcompile.recipes.embeddings import assign_embedding_specs, embeddings_option, gather_rows, untie

KERNELS = ("auto", "custom", "decomposed")
MODES = ("dynamic", "fixed")


@dataclass(frozen=True)
class LLMInt8Options:
    threshold: float = option(6.0, "input features whose magnitude passes it in a call are multiplied in float "
                                   "(LLM.int8()'s 6.0)")
    kernel: str = option("auto", "custom (qcompile's OutlierSplitMatMul, ort-cpu, after `qcompile kernels build`), "
                                 "decomposed (the same in standard ONNX ops: slow), auto (custom where the target "
                                 "has it)")
    mode: str = option("dynamic", "dynamic (the outlier features found in every call) or fixed (those of the "
                                  "calibration data, --calib)")
    embeddings: bool = embeddings_option()


def _llm_int8(settings: Settings) -> list[ir.passes.PassBase]:
    options = settings.options
    if not options.threshold > 0:
        raise UsageError(f"option threshold: expected a positive magnitude, got {options.threshold}")
    if options.mode not in MODES:
        raise UsageError(f"option mode: expected one of {', '.join(MODES)}, got {options.mode!r}")
    fixed = []
    if options.mode == "fixed":
        data = settings.require_calib("llm-int8 mode=fixed", without_data="llm-int8 mode=dynamic")
        fixed = [ChooseOutlierColumnsPass(OutlierColumnsOptions(data, options.threshold))]
    if options.kernel not in KERNELS:
        raise UsageError(f"option kernel: expected one of {', '.join(KERNELS)}, got {options.kernel!r}")
    has_kernels = kernels.DOMAIN in settings.target.custom_op_domains
    decomposed = options.kernel == "decomposed" or (options.kernel == "auto" and not has_kernels)
    if not decomposed:
        if not has_kernels:
            raise UsageError(f"option kernel=custom: qcompile's custom-op library has no kernels for "
                             f"{settings.target.summary} (CPU only so far); use kernel=decomposed")
        kernels.require_library()
    return [
        *canonicalize(PER_CHANNEL_OPSET),
        *untie(settings),
        AssignWeightSpecsPass(WeightSpecOptions(exclude=settings.excluded, op_types=("MatMul", "Gemm"))),
        *assign_embedding_specs(settings),
        *fixed,
        LowerOutlierSplitMatMulPass(OutlierSplitOptions(options.threshold, decomposed)),
        QuantizeWeightsPass(),  # the embedding tables
        *gather_rows(settings),
        EliminateDeadCodePass(),
    ]


RECIPES = [
    Recipe("llm-int8", "LLM.int8(): MatMul / Gemm weights INT8 per output channel; the activations' outlier "
                       "features (|x| > threshold at run time) multiplied in float, the rest INT8 per row "
                       "(qcompile's OutlierSplitMatMul)", LLMInt8Options, _llm_int8),
]
