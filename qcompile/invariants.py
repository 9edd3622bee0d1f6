"""What must hold after every pass (checked by `--verify-each` and always in the test suite)."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.graph import constant_array

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Above this size the checker cannot take the model as one protobuf; only our own invariants run.
CHECKER_LIMIT_BYTES = 1 << 30


def verify_model(model: ir.Model, after: str = "") -> None:
    where = f" after pass {after}" if after else ""
    try:
        _check_graph(model.graph, outer=set())
    except ValueError as exc:
        raise ir.passes.InvariantError(f"invariant broken{where}: {exc}") from None
    from qcompile.io import tensor_bytes

    if tensor_bytes(model) < CHECKER_LIMIT_BYTES:
        try:
            # The checker finds external data files relative to the working directory.
            with _working_directory(_external_data_dir(model) or "."):
                onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ir.passes.InvariantError(f"ONNX checker failed{where}: {exc}") from None


@contextlib.contextmanager
def _working_directory(path: str):
    """contextlib.chdir, which Python 3.10 lacks."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _external_data_dir(model: ir.Model) -> str | None:
    """The folder of the (input's) external data files the model's initializers still point into."""
    return next((str(v.const_value.base_dir) for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)), None)


def _check_graph(graph: ir.Graph, outer: set[ir.Value]) -> None:
    defined = set(outer) | set(graph.inputs) | set(graph.initializers.values())
    for node in graph:
        for value in node.inputs:
            if value is not None and value not in defined:
                raise ValueError(f"node {node.name!r} ({node.op_type}) reads {value.name!r} before it is defined")
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _check_graph(attr.value, defined)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _check_graph(sub, defined)
        if node.op_type in QDQ_OPS and node.domain == "":
            _check_scale(node)
        defined.update(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            raise ValueError(f"graph output {value.name!r} is not produced")


def _check_scale(node: ir.Node) -> None:
    scale = constant_array(node.inputs[1])
    if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ValueError(f"{node.op_type} {node.name!r} has a scale that is not finite and positive")
