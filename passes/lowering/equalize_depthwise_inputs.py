"""Equalize the channels of activations that feed depthwise convolutions.

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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile.calibration import CalibrationOptions
from qcompile.graph import constant_array
from qcompile.notes import add_note
from qcompile.probes import add_reduced_output, measure, node_by_name
from qcompile.quant_spec import CHANNEL_SCALE_KEY, channel_scale_json

# Largest channel scale: a channel that is all but dead would otherwise get an enormous one.
MAX_SCALE = 1e3


@dataclass(frozen=True)
class EqualizeOptions:
    data: str
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)


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


def _scale_constant(value: ir.Value, factor: np.ndarray) -> None:
    array = value.const_value.numpy()
    shape = (-1,) + (1,) * (array.ndim - 1)
    value.const_value = ir.tensor((array * factor.reshape(shape)).astype(array.dtype), name=value.name)


class EqualizeDepthwiseInputsPass(ir.passes.InPlacePass):
    """Scale Conv -> Relu/Clip -> depthwise Conv chains so every channel of the activation spans its grid."""

    name = "equalize-depthwise-inputs"

    def __init__(self, options: EqualizeOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chains = [chain for node in model.graph if (chain := _chain(node)) is not None]
        if not chains:
            return ir.passes.PassResult(model, modified=False)

        def add_probes(probe: ir.Model) -> list[tuple[str, str]]:
            opset = probe.opset_imports.get("", 1)
            names = []
            for chain in chains:
                value = node_by_name(probe, chain.activation.name).outputs[0]
                names.append(add_reduced_output(probe.graph, value, 1, value.shape.rank(), "ReduceMax",
                                                f"{chain.activation.name}_channel_max", opset))
            return names

        maxima = measure(model, add_probes, self.options.data, self.options.calibration, "equalizing depthwise inputs")
        for chain, channel_max in zip(chains, maxima):
            top = float(channel_max.max())
            scale = np.where(channel_max > 0, top / np.maximum(channel_max, top / MAX_SCALE), 1.0)
            _scale_constant(chain.conv.inputs[1], scale)
            if len(chain.conv.inputs) > 2 and chain.conv.inputs[2] is not None:
                _scale_constant(chain.conv.inputs[2], scale)
            for depthwise in chain.depthwise:
                _scale_constant(depthwise.inputs[1], 1.0 / scale)
            for value in (chain.conv.outputs[0], chain.activation.outputs[0]):
                value.metadata_props[CHANNEL_SCALE_KEY] = channel_scale_json(scale[:, None, None])
        add_note(model, f"equalized {len(chains)} activations feeding depthwise convolutions")
        return ir.passes.PassResult(model, modified=True)
