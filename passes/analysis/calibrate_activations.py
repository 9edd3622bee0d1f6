"""Calibrate the activations marked for quantization and attach their `QuantSpec`s."""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common

from qcompile.calibration import CalibrationOptions, calibrate
from qcompile.io import save_model
from qcompile.notes import add_note
from qcompile.op_rules import SHARED_OPS
from qcompile.passes.analysis.select_quantized_ops import NEEDS_RANGE_KEY, QUANTIZED_INPUTS_KEY
from qcompile.quant_spec import QUANT_SPEC_KEY, activation_spec


@dataclass(frozen=True)
class CalibrateOptions:
    data: str
    dtype: ir.DataType = ir.DataType.UINT8
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    # A calibrated range wider than this is not a range an 8-bit grid can serve (an additive
    # attention mask of float-min values, say): the tensor stays float and the report says so.
    max_abs: float = 1e4


def _shared_groups(model: ir.Model, values: list[ir.Value]) -> list[list[ir.Value]]:
    """Values that must share one spec: the quantized inputs and the output of each shared op."""
    parent = {v: v for v in values}

    def find(v):
        while parent[v] is not v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for node in model.graph:
        if node.op_type not in SHARED_OPS or QUANTIZED_INPUTS_KEY not in node.meta:
            continue
        members = [node.inputs[i] for i in node.meta[QUANTIZED_INPUTS_KEY]] + [node.outputs[0]]
        members = [m for m in members if m in parent]
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    groups: dict[ir.Value, list[ir.Value]] = {}
    for v in values:
        groups.setdefault(find(v), []).append(v)
    return list(groups.values())


class CalibrateActivationsPass(ir.passes.InPlacePass):
    """Run the model on calibration data (streaming) and turn each marked tensor's range into a spec."""

    name = "calibrate-activations"

    def __init__(self, options: CalibrateOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = [v for v in _main_graph_values(model) if v.meta.get(NEEDS_RANGE_KEY)]
        if not values:
            return ir.passes.PassResult(model, modified=False)
        ir.passes.common.NameFixPass()(model)  # calibration addresses tensors by (unique) name
        symmetric = self.options.dtype == ir.DataType.INT8
        with tempfile.TemporaryDirectory(prefix="qcompile-calib-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path)
            ranges = calibrate(path, [v.name for v in values], self.options.data, self.options.calibration,
                               symmetric={v.name: symmetric for v in values})
        method = self.options.calibration.method.value
        for group in _shared_groups(model, values):
            merged = [ranges[v.name] for v in group]
            lo, hi = min(r.lo for r in merged), max(r.hi for r in merged)
            nonfinite = sum(r.nonfinite for r in merged)
            names = ", ".join(v.name for v in group)
            if nonfinite:
                add_note(model, f"{names}: {nonfinite} NaN/Inf values in calibration, excluded from the range")
            if not (math.isfinite(lo) and math.isfinite(hi)) or max(-lo, hi) > self.options.max_abs:
                add_note(model, f"{names}: range [{lo:.3g}, {hi:.3g}] is too wide for 8 bits; left float")
                spec = None
            else:
                spec = activation_spec(lo, hi, self.options.dtype, method)
            for v in group:
                del v.meta[NEEDS_RANGE_KEY]
                if spec is not None:
                    v.meta[QUANT_SPEC_KEY] = spec
        return ir.passes.PassResult(model, modified=True)


def _main_graph_values(model: ir.Model) -> list[ir.Value]:
    values = list(model.graph.inputs)
    for node in model.graph:
        values.extend(node.outputs)
    return values


