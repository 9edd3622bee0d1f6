"""Compute a float16 model in float32 between its float16 inputs and outputs.

Models exported in float16, or with Keras' mixed_float16 policy (Cast to float16 around every layer,
in Loop bodies too), were refused: ONNX Runtime's CPU has no float16 QuantizeLinear, QLinearConv or
integer matmul with float16 scales, and runs most float16 ops by casting to float32 and back anyway.
Here every float16 tensor, Cast and constant becomes float32, in subgraphs too; the graph's float16
inputs and outputs stay float16 behind one Cast each, so the model's interface does not change. The
float ops left between Q/DQ then run in float32 (faster on a CPU; on a GPU a float16 island would be).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import all_graphs, graph_values

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
# model.meta: True once float16 tensors were made float32 (`store-float16-weights` stores the weights
# left float in float16 again).
UPCAST_FLOAT16_KEY = "qcompile.upcast_float16"


def _values_of(graph: ir.Graph) -> list[ir.Value]:
    return [*graph_values(graph), *graph.initializers.values()]


def _upcast_value(value: ir.Value) -> bool:
    if value.dtype != F16:
        return False
    if value.const_value is not None:
        value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
    value.dtype = F32
    return True


def _upcast_attributes(node: ir.Node) -> bool:
    changed = False
    if node.op_type == "Cast" and node.domain == "" and node.attributes.get_int("to") == F16:
        node.attributes["to"] = ir.AttrInt64("to", F32)
        changed = True
    value = node.attributes.get("value")
    if node.op_type == "ConstantOfShape" and value is not None and value.value.dtype == F16:
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(value.value.numpy().astype(np.float32)))
        changed = True
    return changed


def _is_cast(node: ir.Node | None, to: ir.DataType) -> bool:
    return node is not None and node.op_type == "Cast" and node.attributes.get_int("to") == to


def has_float16(model: ir.Model) -> bool:
    return any(value.dtype == F16 for graph in all_graphs(model) for value in _values_of(graph))


class UpcastFloat16Pass(ir.passes.InPlacePass):
    """float16 tensors, Casts and constants -> float32; a Cast at each float16 graph input and output."""

    name = "upcast-float16"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        interface = {value for value in (*graph.inputs, *graph.outputs) if value.dtype == F16}
        inputs = [value for value in graph.inputs if value in interface
                  and not all(_is_cast(user, F32) for user, _ in value.uses())]
        outputs = [i for i, value in enumerate(graph.outputs) if value in interface
                   and not _is_cast(value.producer(), F16)]
        modified = bool(inputs or outputs)
        for subgraph in list(all_graphs(model)):
            for value in _values_of(subgraph):
                if value not in interface:
                    modified |= _upcast_value(value)
            for node in subgraph:
                if not any(output in interface for output in node.outputs):
                    modified |= _upcast_attributes(node)
        for value in inputs:
            uses = list(value.uses())
            cast = ir.node("Cast", [value], attributes={"to": F32}, name=f"{value.name}.to_float32")
            upcast = cast.outputs[0]
            upcast.dtype, upcast.shape, upcast.name = F32, value.shape, f"{value.name}.float32"
            for user, index in uses:
                user.replace_input_with(index, upcast)
            graph.insert_before(graph.node(0), cast)
        for index in outputs:
            value = graph.outputs[index]
            value.dtype = F32
            cast = ir.node("Cast", [value], attributes={"to": F16}, name=f"{value.name}.to_float16")
            result = cast.outputs[0]
            result.dtype, result.shape = F16, value.shape
            name, value.name = value.name, f"{value.name}.float32"
            result.name = name
            graph.append(cast)
            graph.outputs[index] = result
        if modified:
            model.meta[UPCAST_FLOAT16_KEY] = True
        return ir.passes.PassResult(model, modified=modified)
