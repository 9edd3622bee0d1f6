"""Float weights marked `INT8_STORAGE_KEY` (`choose-int8-storage`) are stored as INT8, decoded by a Cast
and a Mul.

Layers left float (float islands, recurrent ops, Loop bodies, embedding tables, a recipe's unquantized op
types) would keep their weights' float bytes: a PP-LCNet classifier whose Convs placement kept float
compiled to 0.99x its size. Stored as INT8 with one scale per output channel, such a weight takes a quarter
of the bytes. `Cast(int8) -> Mul(scale)` of initializers, unlike a DequantizeLinear, is folded by ONNX
Runtime when it loads the model (also inside Loop bodies): the layer then runs on the decoded float32
weight, as fast as before.
"""
from __future__ import annotations

import onnx_ir as ir

from qcompile.decisions import INT8_STORAGE_KEY
from qcompile.graph import all_graphs, register_constant
from qcompile.weight_storage import int8_storage


class StoreInt8WeightsPass(ir.passes.InPlacePass):
    """Marked float32 initializers -> INT8 initializer, Cast, Mul by per-channel scales."""

    name = "store-int8-weights"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in list(all_graphs(model)):
            for value in list(graph.initializers.values()):
                if (axes := value.meta.get(INT8_STORAGE_KEY)) is not None and value.dtype == ir.DataType.FLOAT:
                    _decode_in_graph(graph, value, axes)
                    modified = True
        return ir.passes.PassResult(model, modified=modified)


def _decode_in_graph(graph: ir.Graph, value: ir.Value, axes: tuple[int, ...]) -> None:
    """Replace the initializer ``value`` by ``Mul(Cast(int8), scale)`` under its name."""
    name = value.name
    stored, scale = int8_storage(value.const_value.numpy(), axes)
    values = register_constant(graph, f"{name}.int8", stored)
    scale = register_constant(graph, f"{name}.scale", scale)
    cast = ir.node("Cast", [values], attributes={"to": ir.DataType.FLOAT}, name=f"{name}.to_float32")
    mul = ir.node("Mul", [cast.outputs[0], scale], name=f"{name}.decode")
    value.replace_all_uses_with(mul.outputs[0])
    del graph.initializers[name]
    mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = name, value.dtype, value.shape
    # Named here: a Loop body's unnamed values would be named like the main graph's.
    cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = f"{values.name}.float32", value.dtype, \
        value.shape
    graph.insert_before(graph.node(0), [cast, mul])
