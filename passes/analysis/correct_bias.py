"""Bias correction: take out the mean output shift that rounding the weights causes.

Rounding a weight to its grid changes each output channel by op(x, W_q - W). On real data that
change does not average to zero: on a smooth image the nine rounding errors of a depthwise 3x3
kernel add up to an offset of the whole channel, which the following layers amplify (MobileNetV2's
first depthwise conv alone takes the logits to 20 dB SQNR). This pass measures the shift,
E[op(x, W_q - W)] per output channel on the calibration data with float inputs, and subtracts it
from the layer's bias (Nagel et al. 2019, "Data-Free Quantization", empirical bias correction).
As op is linear in x, that is op(E[x], W_q - W): from the mean input that calibration recorded
(`MEAN_KEY`) where there is one, else from a run of its own.

Layers: Conv and Gemm whose weight carries a `QuantSpec` (a missing bias is added: it is an input
of the op, so that costs nothing at run time). A bias that other nodes also read is left alone.
Not MatMul: in a transformer the mean over all token positions is dominated by padding and did
not help (MiniLM's embedding cosine got no better, its worst sentence worse).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile.calibration import MEAN_KEY, CalibrationOptions
from qcompile.graph import constant_array, register_constant
from qcompile.io import runtime_ir_version
from qcompile.notes import add_note
from qcompile.probes import add_reduced_output, measure, node_by_name
from qcompile.quant_spec import QUANT_SPEC_KEY, QuantSpec
from qcompile.runtime import onnxruntime
from qcompile.session import run


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


def _append_shift(graph: ir.Graph, layer: ir.Node, x: ir.Value, error: np.ndarray, opset: int) -> tuple[str, str]:
    """Append op(x, W_q - W), reduced to its mean per output channel, as an output of ``graph``."""
    delta = register_constant(graph, f"{layer.name}_rounding_error", error)
    attributes = {k: v for k, v in layer.attributes.items() if k != "beta"}
    inputs = [x, delta]
    if layer.op_type == "Gemm":  # C is optional only from opset 11
        width = error.shape[0] if layer.attributes.get_int("transB", 0) else error.shape[1]
        inputs.append(register_constant(graph, f"{layer.name}_zero_bias", np.zeros(width, np.float32)))
    shifted = ir.node(layer.op_type, inputs, attributes, name=f"{layer.name}_probe")
    graph.append(shifted)
    return add_reduced_output(graph, shifted.outputs[0], 1, layer.outputs[0].shape.rank(), "ReduceMean",
                              f"{layer.name}_mean_shift", opset)


def _add_probe(probe: ir.Model, layer: ir.Node, error: np.ndarray) -> tuple[str, str]:
    """Add the mean shift of ``layer`` as an output of ``probe``: op(x, W_q - W) on every sample. (Op on
    the batch's mean input is less arithmetic but measured no faster: ONNX Runtime's ReduceMean over
    the batch axis of a conv activation costs about what the convolution does.)"""
    original = node_by_name(probe, layer.name)
    return _append_shift(probe.graph, original, original.inputs[0], error, probe.opset_imports.get("", 1))


def _shifts_from_means(model: ir.Model, layers: list[ir.Node], errors: list[np.ndarray],
                       means: list[np.ndarray]) -> list[np.ndarray]:
    """The mean shifts of ``layers`` from their calibration mean inputs: op(mean, W_q - W) in a small model."""
    opset = model.opset_imports.get("", 1)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name="bias_shifts")
    feed, names = {}, []
    for layer, error, mean in zip(layers, errors, means):
        x = ir.Value(name=f"{layer.name}_mean_input", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape([1, *mean.shape]))
        graph.inputs.append(x)
        feed[x.name] = mean[None]
        names.append(_append_shift(graph, layer, x, error, opset)[0])
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=runtime_ir_version(model)))
    ort = onnxruntime()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [shift.astype(np.float64) for shift in run(sess, names, feed, "bias correction on the mean inputs")]


def _take_means(graph: ir.Graph) -> dict[ir.Value, np.ndarray]:
    """The mean inputs calibration recorded, taken off the values: no copy of the activations lingers."""
    values = [*graph.inputs, *(v for node in graph for v in node.outputs)]
    return {v: v.meta.pop(MEAN_KEY) for v in values if MEAN_KEY in v.meta}


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
        recorded = _take_means(model.graph)
        layers = [node for node in model.graph if _correctable(node)]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        errors = [_rounding_error(layer.inputs[1]) for layer in layers]
        # Mean inputs that calibration recorded spare a run over the data; the other layers are probed.
        means = [recorded.get(layer.inputs[0]) for layer in layers]
        known = [i for i, mean in enumerate(means) if mean is not None]
        probed = [i for i, mean in enumerate(means) if mean is None]
        shifts = {}
        if known:
            shifts.update(zip(known, _shifts_from_means(model, [layers[i] for i in known], [errors[i] for i in known],
                                                        [means[i] for i in known])))
        if probed:
            def add_probes(probe: ir.Model) -> list[tuple[str, str]]:
                return [_add_probe(probe, layers[i], errors[i]) for i in probed]

            shifts.update(zip(probed, measure(model, add_probes, self.options.data, self.options.calibration,
                                              "bias correction")))
        # NaN / Inf in the calibration data make a mean that would turn the bias into garbage.
        skipped = [layer.name for i, layer in enumerate(layers) if not np.isfinite(shifts[i]).all()]
        for i, layer in enumerate(layers):
            if np.isfinite(shifts[i]).all():
                _subtract(model.graph, layer, shifts[i])
        corrected = len(layers) - len(skipped)
        if corrected:
            add_note(model, f"bias correction: {corrected} layers, mean output shift of weight rounding removed")
        if skipped:
            add_note(model, f"bias correction skipped for {len(skipped)} layers whose inputs had NaN or Inf on the "
                            f"calibration data: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}")
        return ir.passes.PassResult(model, modified=corrected > 0)
