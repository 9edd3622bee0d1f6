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
