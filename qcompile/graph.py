"""Small IR helpers shared by passes and tools."""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the main graph and, recursively, of its control-flow subgraphs."""
    return iter(ir.traversal.RecursiveGraphIterator(model.graph))


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph and, recursively, every control-flow subgraph."""
    yield model.graph
    for node in all_nodes(model):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def graph_values(graph: ir.Graph) -> list[ir.Value]:
    """The graph's inputs, then every node's outputs, in order: the values an analysis can decide for."""
    return [*graph.inputs, *(value for node in graph for value in node.outputs)]


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer (not a graph input, which a user could override), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """The interval a Relu or Clip keeps its input in (infinite where unbounded); None if not constant."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    bounds = [-np.inf, np.inf]
    for i, value in enumerate(node.inputs[1:3]):
        if value is not None:
            array = constant_array(value)
            if array is None:
                return None
            bounds[i] = float(array)
    return bounds[0], bounds[1]


def _saturation_interval(node: ir.Node, value: ir.Value) -> tuple[float, float]:
    """The interval outside which ``node``'s output no longer changes with ``value``."""
    if node.domain not in ("", "ai.onnx"):
        return -np.inf, np.inf
    if node.op_type in ("Relu", "Clip") and node.inputs[0] is value:
        return clip_bounds(node) or (-np.inf, np.inf)
    if node.op_type == "HardSwish":
        return -3.0, np.inf
    if node.op_type == "HardSigmoid":
        alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
        return (-beta / alpha, (1 - beta) / alpha) if alpha > 0 else (-np.inf, np.inf)
    if node.op_type == "Mul" and len(node.inputs) == 2:  # x * HardSigmoid(x): a HardSwish written out
        other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
        gate = other.producer() if other is not None else None
        if gate is not None and gate.op_type == "HardSigmoid" and gate.inputs[0] is value:
            return _saturation_interval(gate, value)[0], np.inf
    return -np.inf, np.inf


# Ops whose output cannot leave an interval, whatever their input.
_BOUNDED_OUTPUTS = {"Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0), "Tanh": (-1.0, 1.0)}


def producer_interval(value: ir.Value) -> tuple[float, float]:
    """The interval ``value``'s producer keeps it in (a Sigmoid's (0, 1), a Clip's bounds), else the real line."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return -np.inf, np.inf
    if node.op_type in ("Relu", "Clip"):
        return clip_bounds(node) or (-np.inf, np.inf)
    return _BOUNDED_OUTPUTS.get(node.op_type, (-np.inf, np.inf))


def reader_interval(value: ir.Value) -> tuple[float, float]:
    """The interval outside which none of ``value``'s readers sees a difference (a HardSwish reads
    nothing below -3): values beyond it may be clipped to it without changing any result."""
    if value.is_graph_output():
        return -np.inf, np.inf
    intervals = [_saturation_interval(node, value) for node, _ in value.uses()]
    if not intervals:
        return -np.inf, np.inf
    return min(lo for lo, _ in intervals), max(hi for _, hi in intervals)


def name_matches(name: str | None, patterns: Iterable[str]) -> bool:
    """True if ``name`` matches one of the user's fnmatch patterns (``--exclude``, ``[[nodes]] match``)."""
    return any(fnmatch.fnmatchcase(name or "", pattern) for pattern in patterns)


def has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


def register_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array``, typed and shaped."""
    array = np.asarray(array)
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), type=None)
    value.type = ir.TensorType(value.const_value.dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value
