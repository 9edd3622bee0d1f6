"""Fold a per-channel Mul or Add by a constant into the Conv that feeds it.

paddle2onnx writes PP-LCNet's "learnable affine" blocks and some bias adds as Conv -> Add(c[1, C, 1, 1])
-> Mul(s) -> Add(t), so the Conv's only reader is a float Add. Left alone, the Conv output gets no
QuantizeLinear and ONNX Runtime runs such a Conv in float, its weight dequantized on every call: the
PP-OCRv5 recognizer compiled 1.6x slower than fp32 (issue 19). Folded, the Conv is followed by what
really comes next. Exact up to float rounding: Conv(x, W, b) * s + t = Conv(x, W * s, b * s + t).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import register_constant

FOLDABLE = ("Add", "Mul")


def _channel_vector(constant: np.ndarray, output_rank: int, channels: int) -> np.ndarray | None:
    """``constant`` as one value per output channel, or None if it varies along another axis or would
    broadcast the Conv's output to a larger shape."""
    if constant.ndim > output_rank:
        return None
    dims = (1,) * (output_rank - constant.ndim) + constant.shape
    if any(d != 1 for i, d in enumerate(dims) if i != 1) or dims[1] not in (1, channels):
        return None
    return np.broadcast_to(constant.reshape(-1), (channels,))


def _foldable(conv: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    """The Add/Mul that is the only reader of ``conv``'s output, and its operand per output channel."""
    output = conv.outputs[0]
    uses = list(output.uses())
    if output.is_graph_output() or len(uses) != 1:
        return None
    user = uses[0][0]
    if user.op_type not in FOLDABLE or user.domain != "" or len(user.inputs) != 2:
        return None
    other = user.inputs[1 - uses[0][1]]
    weight = conv.inputs[1]
    if other is None or other.const_value is None or weight is None or weight.const_value is None:
        return None
    if conv.op_type == "ConvTranspose" and conv.attributes.get_int("group", 1) != 1:
        return None
    channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1]
    vector = _channel_vector(other.const_value.numpy(), weight.shape.rank(), channels)  # the output's rank
    return None if vector is None else (user, vector)


def _fold(graph: ir.Graph, conv: ir.Node, user: ir.Node, vector: np.ndarray) -> None:
    weight = conv.inputs[1].const_value.numpy()
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    dtype = weight.dtype
    bias = bias_value.const_value.numpy() if bias_value is not None else np.zeros(len(vector), dtype)
    bias = bias.astype(np.float64)
    if user.op_type == "Mul":
        axis = 0 if conv.op_type == "Conv" else 1
        weight = weight.astype(np.float64) * vector.reshape((-1,) + (1,) * (weight.ndim - 1 - axis))
        bias = bias * vector
    else:
        bias = bias + vector
    new_weight = register_constant(graph, f"{conv.name}.weight", weight.astype(dtype))
    new_bias = register_constant(graph, f"{conv.name}.bias", bias.astype(dtype))
    folded = ir.node(conv.op_type, [conv.inputs[0], new_weight, new_bias], attributes=conv.attributes,
                     name=conv.name, domain=conv.domain)
    ir.convenience.replace_nodes_and_values(graph, conv, [conv, user], [folded], [user.outputs[0]],
                                            [folded.outputs[0]])


class FoldConvAffinePass(ir.passes.InPlacePass):
    """Conv -> Mul/Add(per-channel constant) -> Conv with the constant in its weight and bias (main graph)."""

    name = "fold-conv-affine"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        folded = True
        while folded:  # a chain Conv -> Add -> Mul -> Add folds one op per round
            folded = False
            for conv in list(model.graph):
                if conv.op_type not in ("Conv", "ConvTranspose") or conv.domain != "":
                    continue
                if (found := _foldable(conv)) is not None:
                    _fold(model.graph, conv, *found)
                    folded = modified = True
        return ir.passes.PassResult(model, modified=modified)
