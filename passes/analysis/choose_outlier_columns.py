"""LLM.int8() with fixed outlier columns (`llm-int8`, ``mode=fixed``): on the calibration data, the input features
of each layer `lower-outlier-split-matmul` lowers (`qcompile.op_rules.int8_channel_layers`) whose largest magnitude
passes the threshold. They are
then multiplied in float in every call, whatever the call's data; the others never, even where a call's data
passes the threshold there (detection at run time, ``mode=dynamic``, has no such blind spot, and costs a scan of
the activations per call).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration import CalibrationData, CalibrationRunner
from qcompile.calibration.statistics import ChannelMax
from qcompile.decisions import OUTLIER_COLUMNS_KEY
from qcompile.notes import add_note
from qcompile.op_rules import int8_channel_layers


@dataclass(frozen=True)
class OutlierColumnsOptions:
    data: CalibrationData
    threshold: float


class ChooseOutlierColumnsPass(ir.passes.InPlacePass):
    """Measure the inputs of the layers LLM.int8() lowers and fix the features multiplied in float."""

    name = "choose-outlier-columns"
    reads_calibration_data = True

    def __init__(self, options: OutlierColumnsOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inputs = list(dict.fromkeys(node.inputs[0] for node, _ in int8_channel_layers(model)))
        if not inputs:
            return ir.passes.PassResult(model, modified=False)
        maxima = {x: ChannelMax(-1, absolute=True) for x in inputs}
        CalibrationRunner(model, self.options.data).run({x: [statistic] for x, statistic in maxima.items()},
                                                        "outlier features")
        counts = []
        for x, statistic in maxima.items():
            columns = np.flatnonzero(statistic.value > self.options.threshold).astype(np.int64)
            x.meta[OUTLIER_COLUMNS_KEY] = columns
            counts.append(len(columns))
        add_note(model, f"LLM.int8(): outlier features fixed on the calibration data: {sum(counts)} in all over "
                 f"{len(inputs)} layer inputs (at most {max(counts)} in one), |x| > {self.options.threshold:g}")
        return ir.passes.PassResult(model, modified=True)
