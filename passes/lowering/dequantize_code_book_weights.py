"""Weights stored as code-book indexes (NF4) -> standard ONNX ops that decode them in front of their layers.

For targets without contrib ops (portable, TensorRT): the 4-bit indexes are stored as a UINT4 initializer (opset
21), and ``Cast(DequantizeLinear(indexes), INT64)`` -> ``Gather(code book)`` -> times each block's scale
(double-quantized scales through their own block-wise DequantizeLinear) -> the float weight, which the layer
reads as before. ONNX Runtime folds the subgraph once, when the session starts; the file keeps 4 bits a weight.
The decoding node is marked with the code book's name (`CODE_BOOK_KEY`), so `inspect` reports the layer's
weight as NF4.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.decisions import CODE_BOOK_KEY, QUANT_SPEC_KEY, QuantSpec
from qcompile.graph import register_constant
from qcompile.op_rules import BLOCK_DEQUANTIZE_OPSET
from qcompile.passes.lowering.lower_matmul_bnb4 import block_scales, is_code_book_block


def _node(graph: ir.Graph, before: ir.Node, op_type: str, inputs: list[ir.Value], name: str,
          attributes: dict | None = None) -> ir.Value:
    node = ir.node(op_type, inputs, attributes or {}, name=name)
    node.outputs[0].name = name
    graph.insert_before(before, node)
    return node.outputs[0]


def _decode(graph: ir.Graph, weight: ir.Value, first_user: ir.Node) -> ir.Value:
    """The float weight, decoded from its code-book indexes and block scales by nodes before ``first_user``."""
    spec: QuantSpec = weight.meta[QUANT_SPEC_KEY]
    array = weight.const_value.numpy()
    axis, block_size = spec.granularity.axis, spec.block_size
    name = weight.name
    indexes = register_constant(graph, f"{name}_{spec.grid.name}", spec.quantize(array))
    one = register_constant(graph, f"{name}_index_scale", np.array(1.0, np.float32))
    zero = register_constant(graph, f"{name}_index_zero_point", np.zeros((), spec.numpy_dtype))
    levels = _node(graph, first_user, "DequantizeLinear", [indexes, one, zero], f"{name}_index_levels")
    index = _node(graph, first_user, "Cast", [levels], f"{name}_index", {"to": ir.DataType.INT64})
    book = register_constant(graph, f"{spec.grid.name}_code_book", np.asarray(spec.grid.values, np.float32))
    values = _node(graph, first_user, "Gather", [book, index], f"{name}_code_values")
    # (K, N) -> (k_blocks, block, N) or (N, K) -> (N, k_blocks, block), times the scales with a 1 for the block
    blocked_shape = list(array.shape)
    blocked_shape[axis:axis + 1] = [array.shape[axis] // block_size, block_size]
    scale_shape = list(blocked_shape)
    scale_shape[axis + 1] = 1
    blocks = _node(graph, first_user, "Reshape", [values, register_constant(
        graph, f"{name}_blocked_shape", np.array(blocked_shape, np.int64))], f"{name}_blocks")
    scales = block_scales(graph, weight, first_user, transposed=False)
    scales = _node(graph, first_user, "Reshape", [scales, register_constant(
        graph, f"{name}_scale_shape", np.array(scale_shape, np.int64))], f"{name}_block_scales")
    scaled = _node(graph, first_user, "Mul", [blocks, scales], f"{name}_scaled_blocks")
    decoded = _node(graph, first_user, "Reshape", [scaled, register_constant(
        graph, f"{name}_shape", np.array(array.shape, np.int64))], f"{name}_decoded")
    decoded.producer().metadata_props[CODE_BOOK_KEY] = spec.grid.name
    decoded.type, decoded.shape = weight.type, weight.shape
    return decoded


class DequantizeCodeBookWeightsPass(ir.passes.InPlacePass):
    """Replace each weight with a code-book block spec (NF4) by standard ops decoding its stored 4-bit indexes."""

    name = "dequantize-code-book-weights"

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 1)
        if opset < BLOCK_DEQUANTIZE_OPSET and any(is_code_book_block(v.meta.get(QUANT_SPEC_KEY))
                                                  for v in model.graph.initializers.values()):
            raise ir.passes.PreconditionError(f"4-bit indexes need opset {BLOCK_DEQUANTIZE_OPSET}, the model has {opset}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        order = {node: i for i, node in enumerate(graph)}
        weights = [v for v in graph.initializers.values() if is_code_book_block(v.meta.get(QUANT_SPEC_KEY))]
        for weight in weights:
            first_user = min((user for user, _ in weight.uses()), key=order.__getitem__)
            decoded = _decode(graph, weight, first_user)
            weight.replace_all_uses_with(decoded)
            graph.initializers.pop(weight.name)
        return ir.passes.PassResult(model, modified=bool(weights))
