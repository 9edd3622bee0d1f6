"""The INT8 family: `w8a16` (weight-only), `w8a8` (static), `w8a8-dynamic`."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile.calibration import CalibrationOptions, Method
from qcompile.config import CALIB_METHODS
from qcompile.errors import UsageError
from qcompile.passes.analysis.assign_bias_specs import AssignBiasSpecsPass
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass, WeightSpecOptions
from qcompile.passes.analysis.calibrate_activations import CalibrateActivationsPass, CalibrateOptions
from qcompile.passes.analysis.choose_equalization import ChooseEqualizationOptions, ChooseEqualizationPass
from qcompile.passes.analysis.choose_int8_storage import ChooseInt8StorageOptions, ChooseInt8StoragePass
from qcompile.passes.analysis.choose_smoothing import ChooseSmoothingOptions, ChooseSmoothingPass
from qcompile.passes.analysis.measure_bias_shift import MeasureBiasShiftOptions, MeasureBiasShiftPass
from qcompile.passes.analysis.select_quantized_ops import SelectOptions, SelectQuantizedOpsPass
from qcompile.passes.analysis.share_clip_grids import ShareClipGridsPass
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.fusion.fold_qdq import FoldQDQOptions, FoldQDQPass
from qcompile.passes.fusion.store_float16_weights import StoreFloat16WeightsPass
from qcompile.passes.fusion.store_int8_weights import StoreInt8WeightsPass
from qcompile.passes.lowering.correct_bias import CorrectBiasPass
from qcompile.passes.lowering.fuse_dynamic_matmul import FuseDynamicMatMulPass
from qcompile.passes.lowering.insert_qdq import InsertQDQOptions, InsertQDQPass
from qcompile.passes.lowering.lower_qoperator import LowerQOperatorPass
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.passes.transform.equalize_depthwise_inputs import EqualizeDepthwiseInputsPass
from qcompile.passes.transform.smooth_activations import SmoothActivationsPass
from qcompile.recipes.base import Recipe, Settings, option
from qcompile.recipes.canonical import canonicalize
from qcompile.recipes.embeddings import assign_embedding_specs, embeddings_option, gather_rows, untie
from qcompile.targets.x86 import cpu_profile


def _per_channel():
    return option(True, "one scale per output channel (false: one per tensor)")


def _bias_correction():
    return option(True, "subtract the mean output shift of weight rounding from each bias, measured on the "
                        "calibration data (needs --calib)")


def _cpu():
    return option("any", "CPU the model deploys on (ort-cpu, portable): any (8-bit weights with pair sums limited: "
                         "u8 x s8 kernels exact on every x86), vnni (full-range s8 weights), u8u8 (slower u8 x u8 "
                         "kernels), 7bit, native (detect this machine)")


def _smoothquant(default: str = "auto"):
    return option(default, "SmoothQuant for MatMul inputs: auto (alpha per tensor by estimated noise, or none), "
                           "always (alpha per tensor by estimated noise, never none), off, or a fixed alpha in (0, 1]; "
                           "needs --calib")


def _float_weights_option():
    return option("int8", "weights of layers that compute in float (placement's float islands, LSTM / GRU, Loop "
                          "bodies, ops the recipe does not quantize): int8 (one scale per channel, decoded to float32 "
                          "by a Cast and a Mul that ONNX Runtime folds when it loads the model: a quarter of the "
                          "bytes, the same speed, ~40 dB of weight rounding) or float32")


@dataclass(frozen=True)
class W8A16Options:
    per_channel: bool = _per_channel()
    bias_correction: bool = _bias_correction()
    embeddings: bool = embeddings_option()
    float_weights: str = _float_weights_option()


@dataclass(frozen=True)
class W8A8Options:
    per_channel: bool = _per_channel()
    calib_method: str = option("minmax", "activation ranges: minmax, percentile, entropy, mse")
    percentile: float = option(99.999, "with calib_method=percentile: the percentile of |x| kept")
    headroom: float = option(1.0, "8-bit activation ranges widened by this factor (1 to 16) beyond the calibrated "
                                  "ones, for data that reaches further than the calibration set")
    moving_average: str = option("off", "with calib_method=minmax: c in (0, 1] to average the min/max of each batch "
                                        "(up to 8 samples) as m += c * (batch - m), rather than take the extremes")
    cpu: str = _cpu()
    bias_correction: bool = _bias_correction()
    equalize: bool = option(True, "rescale Conv -> Relu/Clip -> depthwise Conv chains so that every channel of the "
                                  "activation spans its 8-bit grid")
    smoothquant: str = _smoothquant()
    embeddings: bool = embeddings_option()
    float_weights: str = _float_weights_option()
    format: str = option("qdq", "qdq (Q/DQ around float ops: portable, what TensorRT reads) or qoperator "
                                "(ONNX Runtime's QLinearConv / QLinearMatMul / QLinearAdd; ort-cpu only)")
    placement: str = option("measured", "which Convs run on integers: measured (ort-cpu: where the model runs slower "
                                        "than fp32 on this machine or under 20 dB on the calibration data, the "
                                        "float-islands and float placements are measured too, and under 20 dB "
                                        "sensitive-float, the readers of the costliest activation roundings left "
                                        "float; kept is the "
                                        "fastest at 20 dB no slower than fp32, else the fastest at 20 dB slower by "
                                        "no more than the timing noise, else the most accurate no slower than "
                                        "fp32), integer (every Conv; for a deployment machine other than this "
                                        "one), float-islands (Convs with float ops after them left float), float "
                                        "(every layer computes in float, its weights stored as float_weights says: "
                                        "fp32's speed, a quarter of its size with int8)")


@dataclass(frozen=True)
class W8A8SmoothQuantOptions(W8A8Options):
    """`w8a8` with SmoothQuant on every MatMul input that a constant weight reads: the preset for LLMs."""

    smoothquant: str = _smoothquant("always")


@dataclass(frozen=True)
class W8A8DynamicOptions:
    per_channel: bool = _per_channel()
    cpu: str = _cpu()
    bias_correction: bool = _bias_correction()
    smoothquant: str = _smoothquant()
    embeddings: bool = embeddings_option()
    float_weights: str = _float_weights_option()


def _calibration(options: W8A8Options) -> CalibrationOptions:
    method, percentile = options.calib_method, options.percentile
    if method not in CALIB_METHODS:
        raise UsageError(f"option calib_method: expected one of {', '.join(CALIB_METHODS)}, got {method!r}")
    if not 0 < percentile <= 100:
        raise UsageError(f"option percentile: expected a number in (0, 100], got {percentile}")
    moving_average = _fraction("moving_average", options.moving_average)
    if moving_average is not None and method != "minmax":
        raise UsageError(f"option moving_average: it averages min/max, so it needs calib_method=minmax, not {method}")
    return CalibrationOptions(method=Method(method), percentile=percentile, moving_average=moving_average)


MAX_HEADROOM = 16.0  # 4 of 8 bits spent on room no calibrated value used


def _headroom(value: float) -> float:
    if not 1 <= value <= MAX_HEADROOM:
        raise UsageError(f"option headroom: expected a number from 1 to {MAX_HEADROOM:g}, got {value}")
    return value


def _fraction(key: str, text: str, auto: bool = False) -> float | None:
    """A number in (0, 1], or None for "off" (and for "auto" where ``auto`` allows it)."""
    if text == "off" or (auto and text == "auto"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise UsageError(f"option {key}: expected {'auto, always, ' if auto else ''}off or a number in (0, 1], "
                         f"got {text!r}")
    return value


def _corrects_bias(settings: Settings) -> bool:
    """Whether bias correction is asked for and there is data to measure it on (weight-only and dynamic
    recipes take --calib only for this)."""
    return settings.options.bias_correction and settings.calib is not None


def _bias_correction_passes(settings: Settings) -> list[ir.passes.PassBase]:
    if not _corrects_bias(settings):
        return []
    return [MeasureBiasShiftPass(MeasureBiasShiftOptions(settings.calib)), CorrectBiasPass()]


def _untie(settings: Settings) -> list[ir.passes.PassBase]:
    """With INT8 embedding tables, a head tied to one gets its own INT8 weight (else both stay float)."""
    return untie(settings) if settings.options.embeddings else []


FLOAT_WEIGHTS = ("int8", "float32")


def _int8_storage(settings: Settings) -> bool:
    if settings.options.float_weights not in FLOAT_WEIGHTS:
        raise UsageError(f"option float_weights: expected one of {', '.join(FLOAT_WEIGHTS)}, "
                         f"got {settings.options.float_weights!r}")
    return settings.options.float_weights == "int8" and settings.target.folds_int8_weights


def _choose_storage(settings: Settings) -> list[ir.passes.PassBase]:
    """Which weights left float to store as INT8: measured while activations are still float (after Q/DQ,
    a weight's small change flips roundings downstream, which is no error of the weight's)."""
    if not _int8_storage(settings):
        return []
    return [ChooseInt8StoragePass(ChooseInt8StorageOptions(settings.calib, settings.excluded,
                                                           tables=settings.options.embeddings))]


def _stored_weights(settings: Settings) -> list[ir.passes.PassBase]:
    """The weights left float stored as chosen: INT8 where the target folds their decoding, float16 where
    marked and in a model that was float16."""
    return [*([StoreInt8WeightsPass()] if _int8_storage(settings) else []), StoreFloat16WeightsPass()]


def _w8a16(settings: Settings) -> list[ir.passes.PassBase]:
    options = WeightSpecOptions(per_channel=settings.options.per_channel, exclude=settings.excluded,
                                nodes=settings.nodes)
    return [*canonicalize(), *_untie(settings), AssignWeightSpecsPass(options), *assign_embedding_specs(settings),
            *_bias_correction_passes(settings),
            QuantizeWeightsPass(), *gather_rows(settings), *_choose_storage(settings), *_stored_weights(settings),
            EliminateDeadCodePass()]


def integer_weights(settings: Settings, **options) -> WeightSpecOptions:
    """Weight specs for integer kernels: where ONNX Runtime's CPU kernels may run the model, as the
    deployment CPU needs (`qcompile.targets.x86`); elsewhere full-range INT8."""
    cpu = cpu_profile(settings.options.cpu) if settings.target.cpu_kernels else None
    return WeightSpecOptions(per_channel=settings.options.per_channel, exclude=settings.excluded,
                             nodes=settings.nodes, cpu=cpu, **options)


def _smoothing(settings: Settings) -> list[ir.passes.PassBase]:
    """SmoothQuant where it is asked for and there is data to measure it on (w8a8-dynamic takes --calib
    for this and bias correction only)."""
    smoothquant = settings.options.smoothquant
    if smoothquant == "off" or settings.calib is None:
        return []
    always = smoothquant == "always"
    alpha = None if always else _fraction("smoothquant", smoothquant, auto=True)
    return [ChooseSmoothingPass(ChooseSmoothingOptions(settings.calib, alpha, settings.excluded,
                                                       settings.options.per_channel, always=always)),
            SmoothActivationsPass()]


def _qoperator(settings: Settings) -> list[ir.passes.PassBase]:
    if settings.options.format not in ("qdq", "qoperator"):
        raise UsageError(f"option format: expected qdq or qoperator, got {settings.options.format!r}")
    if settings.options.format == "qdq":
        return []
    if not settings.target.qoperator:
        raise UsageError(f"option format=qoperator: ONNX Runtime CPU operators, only for target ort-cpu "
                         f"(not {settings.target.name})")
    return [LowerQOperatorPass()]


PLACEMENTS = ("measured", "integer", "float-islands", "float")


def _placement(settings: Settings) -> str:
    """`placement=measured` compiles as `integer` first (`qcompile.placement` may compile again)."""
    if settings.options.placement not in PLACEMENTS:
        raise UsageError(f"option placement: expected one of {', '.join(PLACEMENTS)}, "
                         f"got {settings.options.placement!r}")
    return settings.options.placement


def _w8a8(settings: Settings) -> list[ir.passes.PassBase]:
    calibration = _calibration(settings.options)
    if _placement(settings) == "float":  # float layers, weights as `float_weights` stores them
        if not settings.target.folds_int8_weights:
            raise UsageError(f"option placement=float stores weights as INT8 behind a Cast and a Mul, which "
                             f"{settings.target.summary} is not relied on to fold: use placement=integer")
        return [*canonicalize(), *_choose_storage(settings), *_stored_weights(settings), EliminateDeadCodePass()]
    target = settings.target
    weights = integer_weights(settings)
    data = settings.require_calib("w8a8")
    if not target.allows(ir.DataType.INT16) and any(table.activation_bits == 16 for table in settings.nodes):
        raise UsageError(f"[[nodes]] activation_bits = 16: {target.summary} takes 8-bit integer Q/DQ only")
    equalize = ([ChooseEqualizationPass(ChooseEqualizationOptions(data)), EqualizeDepthwiseInputsPass()]
                if settings.options.equalize else [])
    return [
        *canonicalize(),
        *_untie(settings),
        *equalize,
        *_smoothing(settings),
        SelectQuantizedOpsPass(SelectOptions(exclude=settings.excluded,
                                             float_islands=_placement(settings) == "float-islands")),
        CalibrateActivationsPass(CalibrateOptions(data, target.activation_dtype, calibration, nodes=settings.nodes,
                                                  record_means=_corrects_bias(settings),
                                                  contrib_16bit=target.contrib_ops,
                                                  headroom=_headroom(settings.options.headroom))),
        *([ShareClipGridsPass()] if target.ort_qdq_layout else []),
        AssignWeightSpecsPass(weights),
        *assign_embedding_specs(settings),
        *_bias_correction_passes(settings),
        *([AssignBiasSpecsPass()] if target.ort_qdq_layout else []),
        QuantizeWeightsPass(),
        *gather_rows(settings),
        *_choose_storage(settings),
        InsertQDQPass(InsertQDQOptions(contrib_16bit=target.contrib_ops)),
        FoldQDQPass(FoldQDQOptions(merge_duplicates=target.ort_qdq_layout)),
        *_qoperator(settings),
        *_stored_weights(settings),
        EliminateDeadCodePass(),
    ]


def _w8a8_dynamic(settings: Settings) -> list[ir.passes.PassBase]:
    if not settings.target.dynamic_activations:
        raise UsageError(f"recipe w8a8-dynamic: {settings.target.summary} has no run-time activation quantization; "
                         f"use w8a8")
    weights = integer_weights(settings, op_types=("MatMul", "Gemm"))
    return [
        *canonicalize(),
        *_untie(settings),
        *_smoothing(settings),
        AssignWeightSpecsPass(weights),
        *assign_embedding_specs(settings),
        *_bias_correction_passes(settings),
        QuantizeWeightsPass(),
        *gather_rows(settings),
        *_choose_storage(settings),
        FuseDynamicMatMulPass(contrib=settings.target.contrib_ops),
        *_stored_weights(settings),
        EliminateDeadCodePass(),
    ]


RECIPES = [
    Recipe("w8a16", "INT8 weight-only: per-channel symmetric INT8 weights behind DequantizeLinear, float activations",
           W8A16Options, _w8a16),
    Recipe("w8a8", "static INT8: per-channel weights, per-tensor activations, calibrated", W8A8Options, _w8a8),
    Recipe("w8a8-smoothquant", "w8a8 for LLMs: SmoothQuant on every MatMul input a constant weight reads, alpha "
                               "chosen per input by estimated noise (w8a8's smoothquant=always)",
           W8A8SmoothQuantOptions, _w8a8),
    Recipe("w8a8-dynamic", "INT8 MatMul/Gemm weights, activations quantized at run time", W8A8DynamicOptions,
           _w8a8_dynamic),
]
