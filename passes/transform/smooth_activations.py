"""SmoothQuant, the rewrite: apply the `Smoothing` that `choose-smoothing` recorded on MatMul inputs.

The rows of the MatMuls' weights are multiplied by s, and the 1/s is folded upstream where that is
exact and X feeds nothing else (`_fold_upstream`): into a Mul by a per-channel constant, a
LayerNormalization's scale and bias, or, through attention's Reshape/Transpose and probabilities @ V,
V's projection. Otherwise a Mul by 1/s is inserted in front of the MatMuls, one per smoothed tensor
(MiniLM: 18 left, after its post-LN LayerNorms, whose outputs also feed the residual, and its GELUs).
Not into a Mul by a scalar: that is the last Mul of a decomposed GELU, which ONNX Runtime fuses into
one Gelu op only while its 0.5 stays a scalar (MiniLM w8a8-dynamic: 0.84 -> 0.82 of fp32 at batch 1
with the Gelu fused and a Mul beside it).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.decisions import CHANNEL_SCALE_KEY, SMOOTHING_KEY, channel_scale_json, take_decisions
from qcompile.graph import constant_array, graph_values, register_constant


def _scale_rows(node: ir.Node, factor: np.ndarray) -> None:
    weight = node.inputs[1]
    array = weight.const_value.numpy()
    weight.const_value = ir.tensor((array * factor[:, None]).astype(array.dtype), name=weight.name)


def _fold_upstream(graph: ir.Graph, x: ir.Value, inverse: np.ndarray) -> list[tuple[ir.Value, np.ndarray]] | None:
    """Divide X by s upstream, where that is exact and costs nothing; None if it cannot.

    The 1/s goes into the first of these found going up: a Mul by a per-channel constant, a
    LayerNormalization's scale and bias, or the output columns of a MatMul by a constant weight. On
    the way it passes ops that carry the channels along unmixed: Reshape, Transpose, an Add of a
    constant (rescaled too), and the second operand of a MatMul of two activations (attention's
    context is softmax weights times V, so the context's 1/s goes into V's projection). Every value
    on the way must feed only the next op. Returns the values rescaled, each with its factor
    (broadcastable to it as numpy aligns shapes).
    """
    rescaled, edits, value, factor = [], [], x, inverse
    while True:
        producer = value.producer()
        if producer is None or producer.domain != "" or value.is_graph_output():
            return None
        if value is not x and len(value.uses()) != 1:
            return None
        rescaled.append((value, factor))
        step = _RESCALE_STEPS.get(producer.op_type)
        if step is None:
            return None
        result = step(graph, producer, value, factor, edits)
        if result is None:
            return None
        if result is _DONE:
            for edit in edits:
                edit()
            return rescaled
        value, factor = result[0], _without_leading_ones(result[1])


_DONE = object()  # a rescale step that reached the op that absorbs the factor


def _without_leading_ones(factor: np.ndarray) -> np.ndarray:
    """(1, 1, 384) as (384,): constants rescaled by it keep their shape (ONNX Runtime fuses a bias Add
    into the MatMul before it only while the bias is a vector)."""
    shape = list(factor.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return factor.reshape(shape)


def _to_rank(factor: np.ndarray, rank: int) -> np.ndarray:
    """``factor`` with leading 1-axes up to ``rank`` axes, as numpy broadcasts it."""
    return factor.reshape((1,) * (rank - factor.ndim) + factor.shape)


def _channel_vector(factor: np.ndarray, width: int) -> np.ndarray | None:
    """``factor`` if it is a vector over ``width`` channels of the last axis (`_fold_upstream` drops
    leading 1-axes); None if it varies along another."""
    return factor if factor.shape == (width,) else None


def _into_mul(graph, node, value, factor, edits):
    for index, operand in enumerate(node.inputs):
        array = constant_array(operand)
        # Not into a scalar: ONNX Runtime fuses a GELU's Mul by 0.5 only while it stays a scalar.
        if array is not None and array.size > 1 and np.broadcast_shapes(array.shape, factor.shape) == array.shape:
            scaled = (array * factor).astype(array.dtype)
            edits.append(lambda i=index: node.replace_input_with(i, register_constant(graph, f"{value.name}_smoothing",
                                                                                        scaled)))
            return _DONE
    return None


def _into_layer_norm(graph, node, value, factor, edits):
    params = [constant_array(v) for v in node.inputs[1:3]]  # scale and bias
    if node.attributes.get_int("axis", -1) != -1 or len(params) < 2 or any(p is None for p in params):
        return None
    vector = _channel_vector(factor, params[0].size)
    if vector is None:
        return None
    for index, array in zip((1, 2), params):
        scaled = (array * vector).astype(array.dtype)
        edits.append(lambda i=index, a=scaled: node.replace_input_with(
            i, register_constant(graph, f"{node.inputs[i].name}_smoothed", a)))
    return _DONE


def _through_matmul(graph, node, value, factor, edits):
    """X @ W with W constant: W's columns absorb the factor. A @ B of activations: on to B, whose
    columns are the output's channels, if the factor is the same for every row."""
    a, b = node.inputs
    weight = constant_array(b)
    if weight is not None:
        vector = _channel_vector(factor, weight.shape[-1]) if weight.ndim == 2 else None
        if vector is None or len(b.uses()) != 1:
            return None
        edits.append(lambda: setattr(b, "const_value", ir.tensor((weight * vector).astype(weight.dtype), name=b.name)))
        return _DONE
    rank = value.shape.rank() if value.shape is not None else None
    if rank is None or rank < 2 or b.shape is None or b.shape.rank() != rank or constant_array(a) is not None:
        return None
    full = _to_rank(factor, rank)
    # Not where B is broadcast along an axis the factor varies on (grouped-query attention's V heads).
    broadcast = any(f != 1 and not _same_dim(d, out)
                    for i, (f, d, out) in enumerate(zip(full.shape, b.shape, value.shape)) if i != rank - 2)
    return (b, full) if full.shape[-2] == 1 and not broadcast else None


def _through_add(graph, node, value, factor, edits):
    """X + c with c constant: c is rescaled too."""
    for index, operand in enumerate(node.inputs):
        array, other = constant_array(operand), node.inputs[1 - index]
        if array is not None and other is not None and _same_shape(other.shape, value.shape):
            scaled = (array * factor).astype(array.dtype)
            edits.append(lambda i=index: node.replace_input_with(i, register_constant(graph, f"{operand.name}_smoothed",
                                                                                        scaled)))
            return other, factor
    return None


def _through_transpose(graph, node, value, factor, edits):
    perm = node.attributes.get_ints("perm")
    if perm is None:
        return None
    return node.inputs[0], _to_rank(factor, len(perm)).transpose(np.argsort(perm))


def _through_reshape(graph, node, value, factor, edits):
    """A Reshape that splits or merges trailing axes, keeping the leading ones."""
    source = node.inputs[0]
    if source.shape is None or value.shape is None:
        return None
    before, after = list(source.shape), list(value.shape)
    kept = 0
    while kept < min(len(before), len(after)) and _same_dim(before[kept], after[kept]):
        kept += 1
    tail_before, tail_after = before[kept:], after[kept:]
    if not all(isinstance(d, int) for d in tail_before + tail_after) or np.prod(tail_before) != np.prod(tail_after):
        return None
    full = _to_rank(factor, len(after))
    if any(d != 1 for d in full.shape[:kept]):
        return None
    tail = np.broadcast_to(full[(0,) * kept], tail_after).reshape(tail_before)
    return source, tail.reshape((1,) * kept + tail.shape)


def _same_dim(a, b) -> bool:
    return a == b and (isinstance(a, int) or a.value is not None)


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(map(_same_dim, a, b))


# op type -> step(graph, node, its output, the output's factor, edits): _DONE where the node absorbs
# the factor, (input, its factor) to go on up, None where it cannot; it appends the rewrites it needs to
# edits, which run only once a chain ends in _DONE.
_RESCALE_STEPS = {"Mul": _into_mul, "LayerNormalization": _into_layer_norm, "MatMul": _through_matmul,
                  "Add": _through_add, "Transpose": _through_transpose, "Reshape": _through_reshape}


def _insert_mul(graph: ir.Graph, x: ir.Value, layers: list[ir.Node], inverse: np.ndarray) -> ir.Value:
    factor = register_constant(graph, f"{x.name}_smoothing", inverse.astype(np.float32))
    mul = ir.node("Mul", [x, factor], name=f"{x.name}_smooth")
    mul.outputs[0].name = f"{x.name}_smoothed"
    mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
    graph.insert_before(min(layers, key=list(graph).index), mul)
    for layer in layers:
        layer.replace_input_with(0, mul.outputs[0])
    return mul.outputs[0]


class SmoothActivationsPass(ir.passes.InPlacePass):
    """Divide MatMul input channels by s_j and multiply the weight rows by s_j, as `choose-smoothing` decided."""

    name = "smooth-activations"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        decided = take_decisions(graph_values(graph), SMOOTHING_KEY)
        for x, smoothing in decided:
            layers = list(smoothing.layers)
            for layer in layers:
                _scale_rows(layer, smoothing.scale)
            inverse = (1.0 / smoothing.scale).astype(np.float32)
            only_smoothed = {user for user, _ in x.uses()} <= set(layers)
            rescaled = only_smoothed and _fold_upstream(graph, x, inverse)
            if not rescaled:
                rescaled = [(_insert_mul(graph, x, layers, inverse), inverse)]
            for value, factor in rescaled:
                value.metadata_props[CHANNEL_SCALE_KEY] = channel_scale_json(factor)
        return ir.passes.PassResult(model, modified=bool(decided))
