"""`qcompile inspect` and `qcompile diff`: what is in a model, and what changed between two."""
from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from qcompile import kernels
from qcompile.graph import all_nodes
from qcompile.layers import layer_precisions
from qcompile.decisions.keys import CHANGED_BY, CREATED_BY


def _shape_text(value: ir.Value) -> str:
    dims = [] if value.shape is None else [str(d) for d in value.shape]
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    return f"{dtype}[{', '.join(dims)}]"


def describe(model: ir.Model) -> dict:
    graph = model.graph
    by_dtype: Counter[str] = Counter()
    for value in graph.initializers.values():
        if value.const_value is not None:
            by_dtype[value.const_value.dtype.name.lower()] += value.const_value.nbytes
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                  for n in all_nodes(model))
    return {
        "ir_version": model.ir_version,
        "opsets": {domain or "ai.onnx": version for domain, version in model.opset_imports.items()},
        "inputs": {v.name: _shape_text(v) for v in graph.inputs},
        "outputs": {v.name: _shape_text(v) for v in graph.outputs},
        "nodes": sum(ops.values()),
        "op_histogram": dict(ops.most_common()),
        "initializer_bytes": dict(by_dtype.most_common()),
        "layers": layer_precisions(model),
        "custom_op_library": model.metadata_props.get(kernels.METADATA_KEY)
        or (kernels.DOMAIN if kernels.DOMAIN in model.opset_imports else None),
    }


def _node_key(node: ir.Node) -> str:
    # Files carry only names: nodes are matched by name, unnamed ones by their first output's name.
    return node.name or f"<{node.op_type} -> {node.outputs[0].name if node.outputs else '?'}>"


def _node_text(node: ir.Node) -> tuple:
    inputs = tuple(v.name if v is not None else "" for v in node.inputs)
    attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()
                         if a.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)))
    return (node.op_type, node.domain, inputs, attrs)


def _passes_that_touched(node: ir.Node) -> str:
    # A layer a pass rebuilt under its old name is "created" by that pass, then maybe changed by others.
    fields = [node.metadata_props.get(CREATED_BY, ""), node.metadata_props.get(CHANGED_BY, "")]
    passes = dict.fromkeys(name for field in fields for name in field.split(",") if name)  # once each, in order
    return ",".join(passes) or "?"


def diff(before: ir.Model, after: ir.Model) -> dict:
    old = {_node_key(n): n for n in all_nodes(before)}
    new = {_node_key(n): n for n in all_nodes(after)}

    def row(node: ir.Node, **extra) -> dict:
        return {"name": _node_key(node), "op_type": node.op_type, **extra}

    added = [row(n, created_by=n.metadata_props.get(CREATED_BY, "?")) for k, n in new.items() if k not in old]
    removed = [row(n) for k, n in old.items() if k not in new]
    changed = [
        row(n, was=old[k].op_type, changed_by=_passes_that_touched(n))
        for k, n in new.items()
        if k in old and _node_text(old[k]) != _node_text(n)
    ]
    by_pass: Counter[str] = Counter(r["created_by"] for r in added)
    for r in changed:
        by_pass.update(r["changed_by"].split(","))
    return {
        "added": added,
        "removed": removed,
        "changed": changed,
        "by_pass": dict(by_pass.most_common()),
        "op_histogram_before": dict(Counter(n.op_type for n in old.values()).most_common()),
        "op_histogram_after": dict(Counter(n.op_type for n in new.values()).most_common()),
    }
