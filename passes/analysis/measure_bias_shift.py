"""Bias correction, the decision: measure the mean output shift that rounding the weights causes.

Rounding a weight to its grid changes each output channel by op(x, W_q - W). On real data that
change does not average to zero: on a smooth image the nine rounding errors of a depthwise 3x3
kernel add up to an offset of the whole channel, which the following layers amplify (MobileNetV2's
first depthwise conv alone takes the logits to 20 dB SQNR). This pass measures the shift,
E[op(x, W_q - W)] per output channel on the calibration data with float inputs, and subtracts it
from the layer's bias (Nagel et al. 2019, "Data-Free Quantization", empirical bias correction).
As op is linear in x, that is op(E[x], W_q - W): from the mean input that calibration recorded
(`MEAN_KEY`) where there is one, else from a calibration run of its own that measures the mean
inputs. The shift is recorded (`BiasCorrection`) on the layer; `correct-bias` subtracts it.

Layers: Conv and Gemm whose weight carries a `QuantSpec`. A bias that other nodes also read is left alone.
Not MatMul: in a transformer the mean over all token positions is dominated by padding and did
not help (MiniLM's embedding cosine got no better, its worst sentence worse).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration import CalibrationData, CalibrationRunner, MeanStatistic
from qcompile.decisions import BIAS_CORRECTION_KEY, MEAN_KEY, QUANT_SPEC_KEY, BiasCorrection, QuantSpec
from qcompile.graph import constant_array, graph_values, register_constant
from qcompile.io import runtime_ir_version
from qcompile.notes import add_note, some_names
from qcompile.runtime import onnxruntime
from qcompile.session import run

# ReduceMean takes its axes as an input from opset 18, as an attribute before.
_AXES_AS_INPUT_OPSET = 18


@dataclass(frozen=True)
class MeasureBiasShiftOptions:
    data: CalibrationData


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


def _append_shift(graph: ir.Graph, layer: ir.Node, x: ir.Value, error: np.ndarray, opset: int, key: str) -> str:
    """Append op(x, W_q - W), reduced to its mean per output channel, as an output of ``graph``."""
    delta = register_constant(graph, f"{key}_rounding_error", error)
    attributes = {k: v for k, v in layer.attributes.items() if k != "beta"}
    inputs = [x, delta]
    if layer.op_type == "Gemm":  # C is optional only from opset 11
        width = error.shape[0] if layer.attributes.get_int("transB", 0) else error.shape[1]
        inputs.append(register_constant(graph, f"{key}_zero_bias", np.zeros(width, np.float32)))
    shifted = ir.node(layer.op_type, inputs, attributes, name=f"{key}_probe")
    graph.append(shifted)
    axes = [a for a in range(layer.outputs[0].shape.rank()) if a != 1]
    if opset >= _AXES_AS_INPUT_OPSET:
        mean = ir.node("ReduceMean", [shifted.outputs[0], register_constant(graph, f"{key}_axes",
                                                                             np.array(axes, np.int64))], {"keepdims": 0})
    else:
        mean = ir.node("ReduceMean", [shifted.outputs[0]], {"axes": axes, "keepdims": 0})
    mean.outputs[0].name = f"{key}_mean_shift"
    graph.append(mean)
    graph.outputs.append(mean.outputs[0])
    return mean.outputs[0].name


def _shifts_from_means(model: ir.Model, layers: list[ir.Node], errors: list[np.ndarray],
                       means: list[list[tuple[np.ndarray, int]]]) -> list[np.ndarray]:
    """The mean shifts of ``layers`` from their mean inputs, op(mean, W_q - W), in a small model: for each
    layer, (mean input, rows) per shape its input took, the shifts weighted by rows."""
    opset = model.opset_imports.get("", 1)
    graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name="bias_shifts")
    feed, names = {}, []
    for i, (layer, error, shapes) in enumerate(zip(layers, errors, means)):
        for k, (mean, _) in enumerate(shapes):
            one_row = np.expand_dims(mean, _row_axis(layer))
            x = ir.Value(name=f"layer{i}_{k}_mean_input", type=ir.TensorType(ir.DataType.FLOAT),
                         shape=ir.Shape(one_row.shape))
            graph.inputs.append(x)
            feed[x.name] = one_row
            names.append(_append_shift(graph, layer, x, error, opset, f"layer{i}_{k}"))
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=runtime_ir_version(model)))
    ort = onnxruntime()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    shifts = iter(run(sess, names, feed, "bias correction on the mean inputs"))
    combined = []
    for shapes in means:
        rows = sum(n for _, n in shapes)
        combined.append(sum(next(shifts).astype(np.float64) * (n / rows) for _, n in shapes))
    return combined


def _row_axis(layer: ir.Node) -> int:
    """The axis of the layer's input along which its rows (samples) lie: 1 for a Gemm that transposes A."""
    return 1 if layer.op_type == "Gemm" and layer.attributes.get_int("transA", 0) else 0


def _take_means(graph: ir.Graph) -> dict[tuple[ir.Value, int], list[tuple[np.ndarray, int]]]:
    """The mean inputs (over axis 0) calibration recorded, taken off the values: no copy of the activations lingers."""
    return {(v, 0): [(v.meta.pop(MEAN_KEY), 1)] for v in graph_values(graph) if MEAN_KEY in v.meta}


class MeasureBiasShiftPass(ir.passes.InPlacePass):
    """Measure, per layer, the mean output shift its weight rounding causes on the calibration data."""

    name = "measure-bias-shift"
    reads_calibration_data = True

    def __init__(self, options: MeasureBiasShiftOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        means = _take_means(model.graph)
        layers = [node for node in model.graph if _correctable(node) and BIAS_CORRECTION_KEY not in node.meta]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        # Mean inputs that calibration recorded spare a run over the data; the other layers' are measured.
        keys = {layer: (layer.inputs[0], _row_axis(layer)) for layer in layers}
        unknown = list(dict.fromkeys(key for key in keys.values() if key not in means))
        if unknown:
            measured = {key: MeanStatistic(key[1]) for key in unknown}
            observed: dict[ir.Value, list[MeanStatistic]] = {}
            for (x, _), statistic in measured.items():
                observed.setdefault(x, []).append(statistic)
            CalibrationRunner(model, self.options.data).run(observed, "bias correction")
            means.update((key, m.by_shape()) for key, m in measured.items())  # NaN: see below
        layers = [layer for layer in layers if means[keys[layer]]]  # none where the data held no samples
        shifts = _shifts_from_means(model, layers, [_rounding_error(layer.inputs[1]) for layer in layers],
                                    [means[keys[layer]] for layer in layers])
        # NaN / Inf in the calibration data make a mean that would turn the bias into garbage.
        skipped = [layer.name for layer, shift in zip(layers, shifts) if not np.isfinite(shift).all()]
        for layer, shift in zip(layers, shifts):
            if np.isfinite(shift).all():
                layer.meta[BIAS_CORRECTION_KEY] = BiasCorrection(shift)
        if skipped:
            add_note(model, f"bias correction skipped for {len(skipped)} layers whose inputs had NaN or Inf on the "
                            f"calibration data: {some_names(skipped)}")
        return ir.passes.PassResult(model, modified=len(layers) > len(skipped))
