"""Bias correction: take out the mean output shift that rounding the weights causes.

Rounding a weight to its grid changes each output channel by op(x, W_q - W). On real data that
change does not average to zero: on a smooth image the nine rounding errors of a depthwise 3x3
kernel add up to an offset of the whole channel, which the following layers amplify (MobileNetV2's
first depthwise conv alone takes the logits to 20 dB SQNR). This pass measures the shift,
E[op(x, W_q - W)] per output channel on the calibration data with float inputs, and subtracts it
from the layer's bias (Nagel et al. 2019, "Data-Free Quantization", empirical bias correction).

Layers: Conv and Gemm whose weight carries a `QuantSpec` (a missing bias is added: it is an input
of the op, so that costs nothing at run time). A bias that other nodes also read is left alone.
Not MatMul: in a transformer the mean over all token positions is dominated by padding and did
not help (MiniLM's embedding cosine got no better, its worst sentence worse).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile.calibration import CalibrationOptions
from qcompile.graph import constant_array, register_constant
from qcompile.notes import add_note
from qcompile.probes import add_reduced_output, add_reduction, measure, node_by_name
from qcompile.quant_spec import QUANT_SPEC_KEY, QuantSpec


@dataclass(frozen=True)
class CorrectBiasOptions:
    data: str
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)


def _correctable(node: ir.Node) -> bool:
    if node.op_type not in ("Conv", "Gemm") or node.domain != "" or node.inputs[0] is None:
        return False
    weight, bias = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if QUANT_SPEC_KEY not in weight.meta or node.outputs[0].shape is None:
        return False
    if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
        return False
    if bias is None:
        return True
    array = constant_array(bias)
    return array is not None and array.ndim == 1 and all(user is node for user, _ in bias.uses())


def _rounding_error(weight: ir.Value) -> np.ndarray:
    spec: QuantSpec = weight.meta[QUANT_SPEC_KEY]
    array = weight.const_value.numpy()
    return (spec.dequantize(spec.quantize(array)) - array).astype(np.float32)


def _add_probe(probe: ir.Model, layer: ir.Node, error: np.ndarray) -> tuple[str, str]:
    """Add the mean of op(x, W_q - W) over all axes but the channel axis as an output of ``probe``.

    op is linear in x, so that is op applied to the batch's mean input: one sample's worth of work
    per batch instead of a second copy of the layer.
    """
    original = node_by_name(probe, layer.name)
    opset = probe.opset_imports.get("", 1)
    delta = register_constant(probe.graph, f"{original.name}_rounding_error", error)
    attributes = {k: v for k, v in original.attributes.items() if k != "beta"}
    rows = 1 if original.op_type == "Gemm" and original.attributes.get_int("transA", 0) else 0
    batch_mean = add_reduction(probe.graph, original.inputs[0], [rows], "ReduceMean", f"{original.name}_batch_mean",
                               opset, keepdims=True)
    inputs = [batch_mean, delta]
    if original.op_type == "Gemm":  # C is optional only from opset 11
        width = error.shape[0] if original.attributes.get_int("transB", 0) else error.shape[1]
        inputs.append(register_constant(probe.graph, f"{original.name}_zero_bias", np.zeros(width, np.float32)))
    shifted = ir.node(original.op_type, inputs, attributes, name=f"{original.name}_probe")
    probe.graph.append(shifted)
    rank = layer.outputs[0].shape.rank()
    return add_reduced_output(probe.graph, shifted.outputs[0], 1, rank, "ReduceMean", f"{original.name}_mean_shift",
                              opset)


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

    def __init__(self, options: CorrectBiasOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [node for node in model.graph if _correctable(node)]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        errors = [_rounding_error(layer.inputs[1]) for layer in layers]

        def add_probes(probe: ir.Model) -> list[tuple[str, str]]:
            return [_add_probe(probe, layer, error) for layer, error in zip(layers, errors)]

        shifts = measure(model, add_probes, self.options.data, self.options.calibration, "bias correction")
        for layer, shift in zip(layers, shifts):
            _subtract(model.graph, layer, shift)
        add_note(model, f"bias correction: {len(layers)} layers, mean output shift of weight rounding removed")
        return ir.passes.PassResult(model, modified=True)
