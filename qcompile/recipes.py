"""Recipes: named, inspectable pass lists with typed parameters (`--option KEY=VALUE`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.calibration import CalibrationOptions, Method
from qcompile.config import CALIB_METHODS, NodeSettings
from qcompile.errors import UsageError
from qcompile.passes import (
    AssignBiasSpecsPass,
    AssignEmbeddingSpecsPass,
    AssignWeightSpecsPass,
    CalibrateActivationsPass,
    CorrectBiasPass,
    EqualizeDepthwiseInputsPass,
    SmoothActivationsPass,
    EliminateDeadCodePass,
    EliminateIdentityPass,
    FoldBatchNormPass,
    FoldQDQPass,
    FuseDynamicMatMulPass,
    FoldConstantsPass,
    FuseMatMulAddPass,
    GatherQuantizedRowsPass,
    InferShapesPass,
    UpgradeOpsetPass,
    InsertQDQPass,
    LowerQOperatorPass,
    MaterializeTransposedWeightsPass,
    QuantizeWeightsPass,
    SelectQuantizedOpsPass,
    ShareClipGridsPass,
)
from qcompile.passes.analysis.assign_embedding_specs import EmbeddingSpecOptions
from qcompile.passes.analysis.calibrate_activations import CalibrateOptions
from qcompile.passes.analysis.correct_bias import CorrectBiasOptions
from qcompile.passes.fusion.fold_qdq import FoldQDQOptions
from qcompile.passes.lowering.insert_qdq import InsertQDQOptions
from qcompile.passes.lowering.equalize_depthwise_inputs import EqualizeOptions
from qcompile.passes.lowering.materialize_transposed_weights import MaterializeOptions
from qcompile.passes.lowering.smooth_activations import SmoothOptions
from qcompile.passes.analysis.select_quantized_ops import SelectOptions
from qcompile.targets import CPU_TARGETS, cpu_profile
from qcompile.passes.analysis.assign_weight_specs import WeightSpecOptions

TARGETS = ("ort-cpu", "ort-cuda", "tensorrt", "portable")


@dataclass(frozen=True)
class Parameter:
    default: bool | int | float | str
    help: str

    def parse(self, key: str, text) -> bool | int | float | str:
        """``text`` from the command line or a config file, or an already typed value (Python API)."""
        kind = type(self.default)
        if not isinstance(text, str):
            if type(text) is kind or (kind is float and type(text) is int):
                return kind(text)
            if kind is str and type(text) in (int, float):  # smoothquant=0.5: a number where text is allowed
                return str(text)
            raise UsageError(f"option {key}: expected {kind.__name__}, got {text!r}")
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise UsageError(f"option {key}: expected true or false, got {text!r}")
            return text.lower() == "true"
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"option {key}: expected {kind.__name__}, got {text!r}") from None


@dataclass(frozen=True)
class Settings:
    """Everything a recipe's pass list depends on."""

    target: str = "ort-cpu"
    options: dict = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    calib: str | None = None
    calib_size: int | None = None
    seed: int = 0
    nodes: tuple[NodeSettings, ...] = ()  # [[nodes]] tables of a --config file

    @property
    def excluded(self) -> tuple[str, ...]:
        """--exclude patterns and those of [[nodes]] tables with quantize = false."""
        return self.exclude + tuple(p for table in self.nodes if table.quantize is False for p in table.match)

    def require_calib(self, recipe: str) -> str:
        if self.calib is None:
            raise UsageError(f"recipe {recipe} calibrates: give --calib DATA (or --calib random for a smoke test)")
        return self.calib


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    parameters: dict[str, Parameter]
    build: Callable[[Settings], list[ir.passes.PassBase]] | None  # None: planned, not built yet

    def resolve_options(self, given: dict[str, str]) -> dict:
        unknown = sorted(set(given) - set(self.parameters))
        if unknown:
            known = ", ".join(sorted(self.parameters)) or "none"
            raise UsageError(f"recipe {self.name} has no option {unknown[0]!r} (its options: {known})")
        return {key: p.parse(key, given[key]) if key in given else p.default for key, p in self.parameters.items()}


def canonicalize() -> list[ir.passes.PassBase]:
    """The passes every recipe starts with."""
    return [
        UpgradeOpsetPass(),
        InferShapesPass(),
        FoldConstantsPass(),
        EliminateIdentityPass(),
        FoldBatchNormPass(),
        FuseMatMulAddPass(),
        EliminateDeadCodePass(),
        InferShapesPass(),
    ]


def _calibration(settings: Settings) -> CalibrationOptions:
    method, percentile = settings.options.get("calib_method", "minmax"), settings.options.get("percentile", 99.999)
    if method not in CALIB_METHODS:
        raise UsageError(f"option calib_method: expected one of {', '.join(CALIB_METHODS)}, got {method!r}")
    if not 0 < percentile <= 100:
        raise UsageError(f"option percentile: expected a number in (0, 100], got {percentile}")
    moving_average = _fraction("moving_average", settings.options.get("moving_average", "off"))
    if moving_average is not None and method != "minmax":
        raise UsageError(f"option moving_average: it averages min/max, so it needs calib_method=minmax, not {method}")
    return CalibrationOptions(method=Method(method), percentile=percentile, moving_average=moving_average,
                              limit=settings.calib_size, seed=settings.seed)


def _fraction(key: str, text: str, auto: bool = False) -> float | None:
    """A number in (0, 1], or None for "off" (and for "auto" where ``auto`` allows it)."""
    if text == "off" or (auto and text == "auto"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise UsageError(f"option {key}: expected {'auto, ' if auto else ''}off or a number in (0, 1], got {text!r}")
    return value


def _corrects_bias(settings: Settings) -> bool:
    """Whether bias correction is asked for and there is data to measure it on (weight-only and dynamic
    recipes take --calib only for this)."""
    return settings.options["bias_correction"] and settings.calib is not None


def _bias_correction(settings: Settings) -> list[ir.passes.PassBase]:
    if not _corrects_bias(settings):
        return []
    return [CorrectBiasPass(CorrectBiasOptions(settings.calib, _calibration(settings)))]


def _embeddings(settings: Settings) -> list[ir.passes.PassBase]:
    return [AssignEmbeddingSpecsPass(EmbeddingSpecOptions(settings.excluded))] if settings.options["embeddings"] else []


def _untie(settings: Settings) -> list[ir.passes.PassBase]:
    """A head tied to the embedding gets its own (quantized) weight, so both tables can be INT8."""
    return [MaterializeTransposedWeightsPass(MaterializeOptions(settings.excluded))] if settings.options["embeddings"] \
        else []


def _gather_rows(settings: Settings) -> list[ir.passes.PassBase]:
    return [GatherQuantizedRowsPass()] if settings.options["embeddings"] else []


def _w8a16(settings: Settings) -> list[ir.passes.PassBase]:
    options = WeightSpecOptions(per_channel=settings.options["per_channel"], exclude=settings.excluded,
                                nodes=settings.nodes)
    return [*canonicalize(), *_untie(settings), AssignWeightSpecsPass(options), *_embeddings(settings),
            *_bias_correction(settings),
            QuantizeWeightsPass(), *_gather_rows(settings), EliminateDeadCodePass()]


def integer_weights(settings: Settings, **options) -> WeightSpecOptions:
    """Weight specs for integer kernels: on ort-cpu and portable ONNX (which ONNX Runtime's CPU kernels
    may run), as the deployment CPU needs (`qcompile.targets`)."""
    dtype, qmax, pair_limit = ir.DataType.INT8, 127, None
    if settings.target in CPU_TARGETS:
        profile = cpu_profile(settings.options["cpu"])
        dtype = ir.DataType.UINT8 if profile.weight_dtype == "uint8" else ir.DataType.INT8
        qmax, pair_limit = profile.weight_qmax, profile.pair_limit
    return WeightSpecOptions(per_channel=settings.options["per_channel"], exclude=settings.excluded,
                             nodes=settings.nodes, dtype=dtype, qmax=qmax, pair_limit=pair_limit, **options)


def _smoothing(settings: Settings) -> list[ir.passes.PassBase]:
    """SmoothQuant where it is asked for and there is data to measure it on (w8a8-dynamic takes --calib
    for this and bias correction only)."""
    if settings.options["smoothquant"] == "off" or settings.calib is None:
        return []
    alpha = _fraction("smoothquant", settings.options["smoothquant"], auto=True)
    return [SmoothActivationsPass(SmoothOptions(settings.calib, alpha, settings.excluded, _calibration(settings),
                                                settings.options["per_channel"]))]


def _qoperator(settings: Settings) -> list[ir.passes.PassBase]:
    if settings.options["format"] not in ("qdq", "qoperator"):
        raise UsageError(f"option format: expected qdq or qoperator, got {settings.options['format']!r}")
    if settings.options["format"] == "qdq":
        return []
    if settings.target != "ort-cpu":
        raise UsageError(f"option format=qoperator: ONNX Runtime CPU operators, only for target ort-cpu "
                         f"(not {settings.target})")
    return [LowerQOperatorPass()]


def _w8a8(settings: Settings) -> list[ir.passes.PassBase]:
    calibration = _calibration(settings)
    activation_dtype = ir.DataType.INT8 if settings.target == "tensorrt" else ir.DataType.UINT8
    weights = integer_weights(settings)
    data = settings.require_calib("w8a8")
    if settings.target == "tensorrt" and any(table.activation_bits == 16 for table in settings.nodes):
        raise UsageError("[[nodes]] activation_bits = 16: TensorRT takes 8-bit integer Q/DQ only")
    equalize = [EqualizeDepthwiseInputsPass(EqualizeOptions(data, calibration))] if settings.options["equalize"] else []
    return [
        *canonicalize(),
        *_untie(settings),
        *equalize,
        *_smoothing(settings),
        SelectQuantizedOpsPass(SelectOptions(exclude=settings.excluded)),
        CalibrateActivationsPass(CalibrateOptions(data, activation_dtype, calibration, nodes=settings.nodes,
                                                  record_means=_corrects_bias(settings))),
        *([] if settings.target == "tensorrt" else [ShareClipGridsPass()]),  # TensorRT fuses Conv + Relu itself
        AssignWeightSpecsPass(weights),
        *_embeddings(settings),
        *_bias_correction(settings),
        *([] if settings.target == "tensorrt" else [AssignBiasSpecsPass()]),
        QuantizeWeightsPass(),
        *_gather_rows(settings),
        InsertQDQPass(InsertQDQOptions(contrib_16bit=settings.target in ("ort-cpu", "ort-cuda"))),
        FoldQDQPass(FoldQDQOptions(merge_duplicates=settings.target != "tensorrt")),
        *_qoperator(settings),
        EliminateDeadCodePass(),
    ]


def _w8a8_dynamic(settings: Settings) -> list[ir.passes.PassBase]:
    if settings.target == "tensorrt":
        raise UsageError("recipe w8a8-dynamic: TensorRT has no run-time activation quantization; use w8a8")
    weights = integer_weights(settings, op_types=("MatMul", "Gemm"))
    return [
        *canonicalize(),
        *_untie(settings),
        *_smoothing(settings),
        AssignWeightSpecsPass(weights),
        *_embeddings(settings),
        *_bias_correction(settings),
        QuantizeWeightsPass(),
        *_gather_rows(settings),
        FuseDynamicMatMulPass(contrib=settings.target in ("ort-cpu", "ort-cuda")),
        EliminateDeadCodePass(),
    ]


_PER_CHANNEL = Parameter(True, "one scale per output channel (false: one per tensor)")
_BIAS_CORRECTION = Parameter(True, "subtract the mean output shift of weight rounding from each bias, "
                                   "measured on the calibration data (needs --calib)")
_CPU = Parameter("any", "CPU the model deploys on (ort-cpu, portable): any (8-bit weights with pair sums limited: "
                        "u8 x s8 kernels exact on every x86), vnni (full-range s8 weights), u8u8 (slower u8 x u8 "
                        "kernels), 7bit, native (detect this machine)")
_EMBEDDINGS = Parameter(True, "store the tables of embedding Gathers as INT8, one scale per row")
_SMOOTHQUANT = Parameter("auto", "SmoothQuant for MatMul inputs: auto (alpha per tensor by estimated noise, "
                                 "or none), off, or a fixed alpha in (0, 1]; needs --calib")
_W8A8_PARAMETERS = {
    "per_channel": _PER_CHANNEL,
    "calib_method": Parameter("minmax", "activation ranges: minmax, percentile, entropy, mse"),
    "percentile": Parameter(99.999, "with calib_method=percentile: the percentile of |x| kept"),
    "moving_average": Parameter("off", "with calib_method=minmax: c in (0, 1] to average the min/max of each batch "
                                       "(up to 8 samples) as m += c * (batch - m), rather than take the extremes"),
    "cpu": _CPU,
    "bias_correction": _BIAS_CORRECTION,
    "equalize": Parameter(True, "rescale Conv -> Relu/Clip -> depthwise Conv chains so that every channel of the "
                                "activation spans its 8-bit grid"),
    "smoothquant": _SMOOTHQUANT,
    "embeddings": _EMBEDDINGS,
    "format": Parameter("qdq", "qdq (Q/DQ around float ops: portable, what TensorRT reads) or qoperator "
                               "(ONNX Runtime's QLinearConv / QLinearMatMul / QLinearAdd; ort-cpu only)"),
}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("canonicalize", "opset raised to 13 where lower, shape inference, constant folding, BN folding, "
               "MatMul+Add->Gemm, DCE; no quantization", {}, lambda settings: canonicalize()),
        Recipe("w8a16", "INT8 weight-only: per-channel symmetric INT8 weights behind DequantizeLinear, float activations",
               {"per_channel": _PER_CHANNEL, "bias_correction": _BIAS_CORRECTION, "embeddings": _EMBEDDINGS}, _w8a16),
        Recipe("w8a8", "static INT8: per-channel weights, per-tensor activations, calibrated", _W8A8_PARAMETERS, _w8a8),
        Recipe("w8a8-dynamic", "INT8 MatMul/Gemm weights, activations quantized at run time",
               {"per_channel": _PER_CHANNEL, "cpu": _CPU, "bias_correction": _BIAS_CORRECTION,
                "smoothquant": _SMOOTHQUANT, "embeddings": _EMBEDDINGS}, _w8a8_dynamic),
        Recipe("w8a8-smoothquant", "w8a8 after SmoothQuant scale migration (LLMs)", {}, None),
        Recipe("w4a16-rtn", "INT4 block-wise weight-only, round to nearest", {}, None),
        Recipe("w4a16-gptq", "INT4 block-wise weight-only, GPTQ", {}, None),
        Recipe("w4a16-awq", "INT4 block-wise weight-only, AWQ", {}, None),
        Recipe("w4a16-hqq", "INT4 block-wise weight-only, HQQ", {}, None),
        Recipe("nf4", "NF4 block-wise weight-only with double-quantized scales", {}, None),
        Recipe("fp8", "FP8 E4M3 weights and activations (Q/DQ)", {}, None),
        Recipe("llm-int8", "LLM.int8(): outlier input channels kept in float, the rest INT8", {}, None),
        Recipe("auto", "per-layer mixed precision chosen by measured sensitivity", {}, None),
    ]
}


def get_recipe(name: str) -> Recipe:
    recipe = RECIPES.get(name)
    if recipe is None:
        raise UsageError(f"unknown recipe {name!r}; `qcompile recipes` lists them")
    if recipe.build is None:
        raise UsageError(f"recipe {name!r} is planned but not built yet; available: {', '.join(available())}")
    return recipe


def available() -> list[str]:
    return [name for name, r in RECIPES.items() if r.build is not None]
