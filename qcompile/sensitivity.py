"""Which activations' rounding costs a compiled model's outputs most: what `placement=measured` leaves
float in its `sensitive-float` candidate.

Each 8-bit activation grid of the compiled model is applied alone to the float model (canonicalized, so
that its tensors carry the compiled model's names), and the model run on the first calibration sample:
one session, in which a scalar input per tensor switches that tensor's rounding on. Errors so measured
add up to about the compiled model's own where activations dominate it, and they rank tensors by what
leaving their readers float would win. Weights are not rounded here: their per-channel grids are fine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.decisions import CHANNEL_SCALE_KEY, read_channel_scale
from qcompile.graph import constant_array, register_constant
from qcompile.io import load_model, save_model
from qcompile.pipeline import Pipeline
from qcompile.recipes.canonical import canonicalize
from qcompile.session import run, session
from qcompile.verify import quantized_readers, worst_sqnr_db


@dataclass(frozen=True)
class Rounding:
    """One activation grid of the compiled model, on the float model's tensor."""
    tensor: str
    scale: np.ndarray
    zero_point: np.ndarray
    factor: np.ndarray | None  # the compiled model rounds tensor * factor (equalized or smoothed)
    readers: tuple[str, ...]  # the nodes that read it quantized: left float, it is not rounded


def activation_roundings(compiled: ir.Model, names: set[str]) -> list[Rounding]:
    """The main graph's 8-bit activation grids of ``compiled`` (one constant scale each) on tensors
    ``names`` holds, directly or as the input of a per-channel Mul that smoothing put in front of them."""
    roundings, seen = [], set()
    for node in compiled.graph:
        if node.op_type != "QuantizeLinear" or node.domain != "" or len(node.inputs) < 3:
            continue
        scale, zero_point = constant_array(node.inputs[1]), constant_array(node.inputs[2])
        if scale is None or scale.size != 1 or zero_point is None or zero_point.dtype not in (np.int8, np.uint8):
            continue
        quantized = node.inputs[0]
        tensor, factor = _float_tensor(quantized, names)
        if tensor is None or tensor in seen or (factor is not None and not np.all(factor)):
            continue
        seen.add(tensor)
        roundings.append(Rounding(tensor, scale, zero_point, factor, tuple(quantized_readers(quantized))))
    return roundings


def _float_tensor(quantized: ir.Value, names: set[str]) -> tuple[str | None, np.ndarray | None]:
    """The float model's tensor that ``quantized`` is, and the factor it was scaled by on the way."""
    if quantized.name in names:
        metadata = quantized.metadata_props.get(CHANNEL_SCALE_KEY)
        return quantized.name, None if metadata is None else read_channel_scale(metadata)
    producer = quantized.producer()
    if producer is not None and producer.op_type == "Mul" and len(producer.inputs) == 2:
        for operand, other in (producer.inputs, producer.inputs[::-1]):
            factor = constant_array(other)
            if operand is not None and operand.name in names and factor is not None:
                return operand.name, factor
    return None, None


def canonical_model(path: Path) -> ir.Model:
    """The float model as every recipe first rewrites it (opset, names, folds)."""
    model = load_model(path)
    Pipeline(canonicalize()).run(model)
    return model


def rounding_errors(model: ir.Model, roundings: list[Rounding], feed: dict[str, np.ndarray],
                    folder: Path) -> list[float]:
    """Each rounding's error alone at ``model``'s outputs on ``feed`` (noise over signal power of the worst
    output). ``model`` is the canonical float model; it is rewritten into the probe."""
    masks = [_insert_rounding(model.graph, rounding, i) for i, rounding in enumerate(roundings)]
    model.graph.sort()
    probe = session(save_model(model, folder / "sensitivity.onnx"), integer_kernels=False)
    off = {mask: np.zeros((), np.float32) for mask in masks}
    expected = run(probe, None, {**feed, **off}, "the model on calibration data")
    errors = []
    for mask in masks:
        outputs = run(probe, None, {**feed, **off, mask: np.ones((), np.float32)}, "the model on calibration data")
        errors.append(10 ** (-worst_sqnr_db(expected, outputs) / 10))
    return errors


def _insert_rounding(graph: ir.Graph, rounding: Rounding, index: int) -> str:
    """x -> x + mask * (rounded(x) - x) in front of x's readers, mask a new scalar input (its name)."""
    x = next(v for v in [*graph.inputs, *(out for node in graph for out in node.outputs)] if v.name == rounding.tensor)
    readers = list(x.uses())
    mask = ir.Value(name=f"qcompile_rounding_{index}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    graph.inputs.append(mask)
    scale = register_constant(graph, f"{x.name}_probe_scale", rounding.scale.reshape(()).astype(np.float32))
    zero_point = register_constant(graph, f"{x.name}_probe_zero_point", rounding.zero_point.reshape(()))
    nodes, scaled = [], x
    if rounding.factor is not None:
        factor = register_constant(graph, f"{x.name}_probe_factor", rounding.factor.astype(np.float32))
        nodes.append(ir.node("Mul", [x, factor]))
        scaled = nodes[-1].outputs[0]
    nodes.append(ir.node("QuantizeLinear", [scaled, scale, zero_point]))
    nodes.append(ir.node("DequantizeLinear", [nodes[-1].outputs[0], scale, zero_point]))
    if rounding.factor is not None:
        nodes.append(ir.node("Div", [nodes[-1].outputs[0], factor]))
    nodes.append(ir.node("Sub", [nodes[-1].outputs[0], x]))
    nodes.append(ir.node("Mul", [nodes[-1].outputs[0], mask]))
    nodes.append(ir.node("Add", [x, nodes[-1].outputs[0]]))
    for k, node in enumerate(nodes):
        node.outputs[0].name = f"{x.name}_probe_{k}"
    graph.extend(nodes)
    for user, i in readers:
        user.replace_input_with(i, nodes[-1].outputs[0])
    return mask.name


def readers_to_leave_float(roundings: list[Rounding], errors: list[float], budget: float) -> list[str]:
    """The readers of the costliest roundings, taken until the roundings still read quantized by some node
    left integer have errors that sum to ``budget`` or less: a chain of roundings on one grid (through a
    Transpose, say) goes with its last reader, and each is counted once."""
    excluded: list[str] = []
    costliest_first = sorted(zip(roundings, errors), key=lambda pair: -pair[1])
    for rounding, _ in costliest_first:
        if sum(error for r, error in costliest_first if not set(r.readers) <= set(excluded)) <= budget:
            break
        excluded += [name for name in rounding.readers if name not in excluded]
    return excluded
