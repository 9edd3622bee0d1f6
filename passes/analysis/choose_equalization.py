"""Equalization, the decision: scales for the channels of activations that feed depthwise convolutions.

One 8-bit grid per tensor serves every channel of an activation; a channel whose values stay far
below the tensor's maximum gets few of its levels, and the depthwise conv that reads it may
amplify that noise a lot (MobileNetV2's first ReLU6 output alone takes the logits to 22 dB SQNR).
For Conv -> Relu/Clip(0, hi) -> depthwise Conv, scaling output channel c of the first conv by
s_c and the depthwise kernel c by 1/s_c leaves the function unchanged (Relu commutes with s_c > 0)
and, as both weights are quantized per channel, leaves their quantization unchanged too. With
s_c = T / m_c, where m_c is channel c's maximum on the calibration data and T the largest of them,
every channel spans the whole grid. (Cross-layer equalization, Nagel et al. 2019, in the case
where it is free.)

A Clip keeps its bound hi, so channel c is then clipped at hi * m_c / T >= m_c in its original
units: nothing changes on the calibration data, and values above it elsewhere are clipped there
instead of at hi, as the per-tensor quantizer clips everything above T.

The factors (`Equalization`) are recorded on the chain's first Conv; `equalize-depthwise-inputs`
applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration import CalibrationData, CalibrationRunner, ChannelMax
from qcompile.decisions import EQUALIZATION_KEY, Equalization
from qcompile.graph import constant_array

# Largest channel scale: a channel that is all but dead would otherwise get an enormous one.
MAX_SCALE = 1e3


@dataclass(frozen=True)
class ChooseEqualizationOptions:
    data: CalibrationData


@dataclass
class _Chain:
    conv: ir.Node
    activation: ir.Node  # Relu or Clip(0, hi)
    depthwise: list[ir.Node]


def _only_used_by(value: ir.Value | None, node: ir.Node) -> bool:
    return value is None or all(user is node for user, _ in value.uses())


def _is_depthwise(node: ir.Node, channels: int) -> bool:
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return (node.op_type == "Conv" and node.domain == "" and weight is not None
            and node.attributes.get_int("group", 1) == channels == weight.shape[0] and weight.shape[1] == 1
            and _only_used_by(node.inputs[1], node))


def _is_relu_like(node: ir.Node) -> bool:
    if node.domain != "" or node.op_type not in ("Relu", "Clip"):
        return False
    if node.op_type == "Clip":
        low = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return low is not None and low.size == 1 and float(low) == 0.0
    return True


def _chain(conv: ir.Node) -> _Chain | None:
    if conv.op_type != "Conv" or conv.domain != "" or len(conv.outputs[0].uses()) != 1:
        return None
    weight = constant_array(conv.inputs[1])
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    if weight is None or (bias is not None and constant_array(bias) is None):
        return None
    if not (_only_used_by(conv.inputs[1], conv) and _only_used_by(bias, conv)):
        return None
    activation, _ = next(iter(conv.outputs[0].uses()))
    if (not _is_relu_like(activation) or activation.outputs[0].is_graph_output()
            or activation.outputs[0].shape is None):
        return None
    users = [user for user, _ in activation.outputs[0].uses()]
    if not users or not all(_is_depthwise(user, weight.shape[0]) for user in users):
        return None
    return _Chain(conv, activation, users)


class ChooseEqualizationPass(ir.passes.InPlacePass):
    """Measure each channel of Conv -> Relu/Clip -> depthwise Conv activations and decide its scale."""

    name = "choose-equalization"
    reads_calibration_data = True

    def __init__(self, options: ChooseEqualizationOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chains = [chain for node in model.graph if EQUALIZATION_KEY not in node.meta and (chain := _chain(node))]
        if not chains:
            return ir.passes.PassResult(model, modified=False)
        maxima = {chain.activation.outputs[0]: ChannelMax(1) for chain in chains}
        CalibrationRunner(model, self.options.data).run({value: [m] for value, m in maxima.items()},
                                                        "equalizing depthwise inputs")
        for chain in chains:
            channel_max = maxima[chain.activation.outputs[0]].value
            top = float(channel_max.max())
            scale = (np.where(channel_max > 0, top / np.maximum(channel_max, top / MAX_SCALE), 1.0) if top > 0
                     else np.ones_like(channel_max))  # an activation that is zero on all the data
            chain.conv.meta[EQUALIZATION_KEY] = Equalization(scale, chain.activation, tuple(chain.depthwise))
        return ir.passes.PassResult(model, modified=True)
