"""Calibrate the activations marked for quantization and attach their `QuantSpec`s."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import onnx_ir as ir

from qcompile.calibration import CalibrationData, CalibrationOptions, CalibrationRunner, Method, calibrate_ranges
from qcompile.config import NodeSettings, settings_for
from qcompile.decisions import (FLOAT8_TYPES, MEAN_KEY, NEEDS_RANGE_KEY, QUANT_SPEC_KEY, QUANTIZED_INPUTS_KEY,
                                SHARED_SPEC_KEY, FloatGrid, IntegerGrid, activation_spec)
from qcompile.errors import UsageError
from qcompile.graph import all_nodes, graph_values, name_matches, producer_interval, reader_interval
from qcompile.notes import add_note
from qcompile.op_rules import MIN_OPSET_16BIT_QDQ

# Range searches that weigh clipping against rounding: over 2048 histogram bins they cannot resolve a
# 16-bit grid's steps, so a 16-bit tensor gets minmax.
_EIGHT_BIT_SEARCHES = (Method.ENTROPY, Method.MSE)


@dataclass(frozen=True)
class CalibrateOptions:
    data: CalibrationData
    dtype: ir.DataType = ir.DataType.UINT8
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    # A calibrated range wider than this is not a range an integer grid should serve (an additive
    # attention mask of float-min values, say): the tensor stays float and the report says so.
    max_abs: float = 1e4
    # Unseen data reaches past the calibrated range, and a value clipped there can cost more than a
    # coarser step: an 8-bit range is this many times the calibrated one (`headroom`). A 16-bit grid has
    # levels to spare: its range is this many times the calibrated one (2 of 16 bits).
    headroom: float = 1.0
    headroom_16bit: float = 4.0
    # Per-node calib_method / percentile / activation_bits (16: INT16) for the tensors they read.
    nodes: tuple[NodeSettings, ...] = ()
    # Also record the mean input of each Conv / Gemm (value.meta[MEAN_KEY]) for measure-bias-shift,
    # which then needs no run over the data of its own.
    record_means: bool = False
    # 16-bit grids below opset 21 may use ONNX Runtime's com.microsoft Q/DQ (`insert-qdq`).
    contrib_16bit: bool = True


def _shared_groups(values: list[ir.Value]) -> list[list[ir.Value]]:
    """The values in groups that share one spec (`SharedSpec`), in order."""
    groups: dict[ir.Value, list[ir.Value]] = {}
    for value in values:
        shared = value.meta.get(SHARED_SPEC_KEY)
        groups.setdefault(value if shared is None else shared.representative, []).append(value)
    return list(groups.values())


class CalibrateActivationsPass(ir.passes.InPlacePass):
    """Run the model on calibration data (streaming) and turn each marked tensor's range into a spec."""

    name = "calibrate-activations"
    reads_calibration_data = True
    node_settings = ("calib_method", "percentile", "activation_bits")

    def __init__(self, options: CalibrateOptions):
        super().__init__()
        self.options = options

    def requires(self, model: ir.Model) -> None:
        self.check_input(model)

    def check_input(self, model: ir.Model) -> None:
        """Refuse before anything reads the data (the pipeline runs this on the input model) what
        `insert-qdq` would refuse at the end: 16-bit activations where the model's opset has no 16-bit
        QuantizeLinear/DequantizeLinear and the target takes no contrib ops."""
        opset = model.opset_imports.get("", 1)
        if self.options.contrib_16bit or opset >= MIN_OPSET_16BIT_QDQ:
            return
        names = [node.name for node in all_nodes(model)]
        for pattern in (p for table in self.options.nodes if table.activation_bits == 16 for p in table.match):
            if any(name_matches(name, (pattern,)) for name in names):
                raise UsageError(f"[[nodes]] match {pattern!r}: activation_bits = 16 needs 16-bit QuantizeLinear/"
                                 f"DequantizeLinear, which need opset {MIN_OPSET_16BIT_QDQ}, the model has opset "
                                 f"{opset} (or use target ort-cpu)")

    def ensures(self, model: ir.Model) -> None:
        if any(NEEDS_RANGE_KEY in v.meta for v in graph_values(model.graph)):
            raise ir.passes.PostconditionError("a tensor marked for calibration has no range")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = [v for v in graph_values(model.graph) if v.meta.get(NEEDS_RANGE_KEY)]
        if not values:
            return ir.passes.PassResult(model, modified=False)
        groups = _shared_groups(values)
        settings = [self._settings_for(group) for group in groups]
        calibrations = [calibration for calibration, _ in settings]
        symmetric = {v: dtype in (ir.DataType.INT8, *FLOAT8_TYPES) for group, (_, dtype) in zip(groups, settings)
                     for v in group}
        grids = {v: FloatGrid(dtype) if dtype in FLOAT8_TYPES else IntegerGrid(dtype)
                 for group, (_, dtype) in zip(groups, settings) for v in group}
        means = {v for v in values if self.options.record_means and _read_by_layer(v)}
        ranges = {}
        runner = CalibrationRunner(model, self.options.data)
        for calibration in dict.fromkeys(calibrations):  # one run over the data per distinct setting
            chosen = [v for group, c in zip(groups, calibrations) if c == calibration for v in group]
            ranges.update(calibrate_ranges(runner, chosen, calibration, symmetric, grids, means))
        for group, (calibration, dtype) in zip(groups, settings):
            merged = [ranges[v] for v in group]
            lo, hi = min(r.lo for r in merged), max(r.hi for r in merged)
            nonfinite = sum(r.nonfinite for r in merged)
            names = ", ".join(v.name for v in group)
            if nonfinite:
                add_note(model, f"{names}: {nonfinite} NaN/Inf values in calibration, excluded from the range")
            if not (math.isfinite(lo) and math.isfinite(hi)) or max(-lo, hi) > self.options.max_abs:
                add_note(model, f"{names}: range [{lo:.3g}, {hi:.3g}] is too wide for "
                              f"{16 if dtype == ir.DataType.INT16 else 8} bits; left float")
                spec = None
            else:
                widen = self.options.headroom_16bit if dtype == ir.DataType.INT16 else self.options.headroom
                spec = activation_spec(*_within_reach(lo * widen, hi * widen, group), dtype,
                                       calibration.method.value)
            for v in group:
                del v.meta[NEEDS_RANGE_KEY]
                if spec is not None:
                    v.meta[QUANT_SPEC_KEY] = spec
                if ranges[v].mean is not None:
                    v.meta[MEAN_KEY] = ranges[v].mean
        return ir.passes.PassResult(model, modified=True)

    def _settings_for(self, group: list[ir.Value]) -> tuple[CalibrationOptions, ir.DataType]:
        """The recipe's calibration and dtype with the [[nodes]] settings of the ops that read the group
        quantized; ops that ask for different settings for one tensor are a usage error."""
        chosen, chosen_by = {}, None
        for value in group:
            for user, index in value.uses():
                wanted = {k: v for k, v in settings_for(self.options.nodes, user.name).items()
                          if k in ("calib_method", "percentile", "activation_bits")}
                if index not in user.meta.get(QUANTIZED_INPUTS_KEY, ()) or not wanted:
                    continue
                if chosen_by is not None and wanted != chosen:
                    raise UsageError(f"tensor {value.name}: nodes {chosen_by} and {user.name} ask for different "
                                     f"calibration ({chosen} vs {wanted}); its readers share one scale")
                chosen, chosen_by = wanted, user.name
        calibration = self.options.calibration
        if "calib_method" in chosen:
            calibration = replace(calibration, method=Method(chosen["calib_method"]))
        if "percentile" in chosen:
            calibration = replace(calibration, percentile=chosen["percentile"])
        if chosen.get("activation_bits") != 16:
            return calibration, self.options.dtype
        if calibration.method in _EIGHT_BIT_SEARCHES:
            if "calib_method" in chosen:
                raise UsageError(f"node {chosen_by}: calib_method {calibration.method.value} searches the range "
                                 f"for an 8-bit grid; with activation_bits = 16 use minmax or percentile")
            calibration = replace(calibration, method=Method.MINMAX)
        return calibration, ir.DataType.INT16


def _within_reach(lo: float, hi: float, group: list[ir.Value]) -> tuple[float, float]:
    """[lo, hi] cut to what the group's producers can emit (`headroom` does not widen a Sigmoid's output
    past 1) and to where its readers see a difference: the grid of a Conv output that only a HardSwish
    reads need not reach below -3, and its step halves where the range went down to -120."""
    produced = [producer_interval(v) for v in group]
    lo, hi = _cut(lo, hi, min(p[0] for p in produced), max(p[1] for p in produced))
    read = [reader_interval(v) for v in group]
    low, high = min(r[0] for r in read), max(r[1] for r in read)
    # one 8-bit step past a cut, so that the grid's end, after its zero point is rounded, still lies
    # beyond it: at -2.9 rather than -3, every value below -3 would read HardSwish(-2.9) = -0.05, not 0
    step = (min(hi, high) - max(lo, low)) / 254
    return _cut(lo, hi, low - step, high + step)


def _cut(lo: float, hi: float, low: float, high: float) -> tuple[float, float]:
    """[lo, hi] within [low, high], or as it is where they do not overlap."""
    cut = max(lo, low), min(hi, high)
    return cut if cut[0] < cut[1] else (lo, hi)


def _read_by_layer(value: ir.Value) -> bool:
    """Whether a Conv or Gemm reads ``value`` as its data input, one row (sample) per index of axis 0."""
    return any(index == 0 and user.domain == "" and (user.op_type == "Conv" or (
        user.op_type == "Gemm" and not user.attributes.get_int("transA", 0))) for user, index in value.uses())


