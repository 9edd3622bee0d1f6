"""Measure per-channel statistics by running a probed copy of a model on calibration data.

A pass that needs, say, the mean of some function of a layer's input builds it as extra nodes
ending in a ReduceMean / ReduceMax over the batch axis (`add_reduced_output`) on a copy of the
model; `measure` runs that copy over the data batch by batch, in one pass, and combines the reduced
outputs, so memory stays bounded by one batch. The model itself is never touched.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from qcompile.calibration import CalibrationOptions, reduce_outputs
from qcompile.data import model_inputs
from qcompile.graph import register_constant
from qcompile.io import load_model, save_model

# ReduceMean / ReduceMax take their axes as an input from opset 18, as an attribute before.
_AXES_AS_INPUT_OPSET = 18


def add_reduced_output(graph: ir.Graph, value: ir.Value, keep_axis: int, rank: int, op_type: str, name: str,
                       opset: int) -> tuple[str, str]:
    """Make ``op_type`` (ReduceMean / ReduceMax) of ``value`` over every axis but ``keep_axis`` a graph
    output; returns (its name, how `measure` combines it over batches)."""
    axes = [a for a in range(rank) if a != keep_axis % rank]
    if opset >= _AXES_AS_INPUT_OPSET:
        node = ir.node(op_type, [value, register_constant(graph, f"{name}_axes", np.array(axes, np.int64))],
                       {"keepdims": 0})
    else:
        node = ir.node(op_type, [value], {"axes": axes, "keepdims": 0})
    node.outputs[0].name = name
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    return name, "mean" if op_type == "ReduceMean" else "max"


def measure(model: ir.Model, add_probes: Callable[[ir.Model], list[tuple[str, str]]], data: str,
            options: CalibrationOptions, description: str) -> list[np.ndarray]:
    """Run a copy of ``model`` that ``add_probes`` extends over ``data``, and combine each output it
    adds (it returns (name, "mean" or "max") pairs) over the samples; in that order.

    ``add_probes`` finds nodes in the copy by name: node names are made unique here first.
    """
    ir.passes.common.NameFixPass()(model)
    inputs = model_inputs(model)
    with tempfile.TemporaryDirectory(prefix="qcompile-probe-") as tmp:
        probe = load_model(save_model(model, Path(tmp) / "model.onnx"))
        outputs = dict(add_probes(probe))
        probe_path = save_model(probe, Path(tmp) / "probe.onnx")
        del probe  # the session reads the file; do not keep the copy's weights alive
        combined = reduce_outputs(probe_path, inputs, outputs, data, options, description)
    return [combined[name] for name in outputs]


def node_by_name(model: ir.Model, name: str) -> ir.Node:
    return next(node for node in model.graph if node.name == name)
