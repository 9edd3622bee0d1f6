"""Equalization, the rewrite: apply the `Equalization` that `choose-equalization` recorded.

Output channel c of the first Conv (weight and bias) is scaled by s_c and depthwise kernel c by 1/s_c;
the activation between them is recorded as rescaled (`CHANNEL_SCALE_KEY`) so that comparisons with
the original model can undo it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.decisions import CHANNEL_SCALE_KEY, EQUALIZATION_KEY, channel_scale_json, take_decisions
from qcompile.notes import add_note


def _scale_constant(value: ir.Value, factor: np.ndarray) -> None:
    array = value.const_value.numpy()
    shape = (-1,) + (1,) * (array.ndim - 1)
    value.const_value = ir.tensor((array * factor.reshape(shape)).astype(array.dtype), name=value.name)


class EqualizeDepthwiseInputsPass(ir.passes.InPlacePass):
    """Scale Conv -> Relu/Clip -> depthwise Conv chains so every channel of the activation spans its grid."""

    name = "equalize-depthwise-inputs"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        decided = take_decisions(model.graph, EQUALIZATION_KEY)
        for conv, equalization in decided:
            scale = equalization.scale
            _scale_constant(conv.inputs[1], scale)
            if len(conv.inputs) > 2 and conv.inputs[2] is not None:
                _scale_constant(conv.inputs[2], scale)
            for depthwise in equalization.depthwise:
                _scale_constant(depthwise.inputs[1], 1.0 / scale)
            for value in (conv.outputs[0], equalization.activation.outputs[0]):
                value.metadata_props[CHANNEL_SCALE_KEY] = channel_scale_json(scale[:, None, None])
        if decided:
            add_note(model, f"equalized {len(decided)} activations feeding depthwise convolutions")
        return ir.passes.PassResult(model, modified=bool(decided))
