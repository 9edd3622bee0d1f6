"""Bias correction, the rewrite: subtract from each layer's bias the `BiasCorrection` that
`measure-bias-shift` recorded (a missing bias is added: it is an input of the op, so that costs
nothing at run time)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.decisions import BIAS_CORRECTION_KEY, take_decisions
from qcompile.graph import register_constant
from qcompile.notes import add_note


def _subtract(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:  # give it one
        bias = register_constant(graph, f"{node.name}_bias", np.zeros(shift.shape, np.float32))
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
    corrected = (bias.const_value.numpy().astype(np.float64) - shift).astype(np.float32)
    bias.const_value = ir.tensor(corrected, name=bias.name)


class CorrectBiasPass(ir.passes.InPlacePass):
    """Subtract from each bias the mean shift its layer's weight rounding causes on calibration data."""

    name = "correct-bias"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        decided = take_decisions(model.graph, BIAS_CORRECTION_KEY)
        for node, correction in decided:
            _subtract(model.graph, node, correction.shift)
        if decided:
            add_note(model, f"bias correction: {len(decided)} layers, mean output shift of weight rounding removed")
        return ir.passes.PassResult(model, modified=bool(decided))
