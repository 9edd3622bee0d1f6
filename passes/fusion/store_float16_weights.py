"""In a model that was float16, the float weights are stored in float16 again, behind a Cast to float32;
in any model, so are those `choose-int8-storage` found the outputs bear in float16 but not in INT8.

A float16 model computes in float32 here (`upcast-float16`), so the weights left float (in Loop bodies,
in layers kept float) would take twice the bytes they took in the input: a Keras mixed-precision model
compiled 1.06x its size, a MobileNetV4 whose Convs placement kept float 1.19x. ONNX Runtime folds the
Cast of an initializer when it loads the model: no cost when it runs. Weights the input held in float16
come back exactly; those BatchNorm folding changed are rounded to float16, as the input held their
factors (relative error at most 2^-11, ~66 dB). Not tensors float16 cannot hold (beyond 65504, or
with more than a millionth of their energy in values it would flush to zero), nor the scales and zero
points that Q/DQ read.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.decisions import FLOAT16_STORAGE_KEY
from qcompile.graph import all_graphs, register_constant
from qcompile.layers import decoded_integer
from qcompile.passes.canonicalize.upcast_float16 import UPCAST_FLOAT16_KEY
from qcompile.weight_storage import float16_copy

MIN_ELEMENTS = 16  # smaller constants (clip bounds, shapes' scalars) gain nothing
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _stored_float16(value: ir.Value) -> np.ndarray | None:
    if value.dtype != ir.DataType.FLOAT or value.const_value is None or value.is_graph_output():
        return None
    if any(user.op_type in QDQ_OPS or decoded_integer(user.outputs[0]) is not None for user, _ in value.uses()):
        return None  # a scale: of a Q/DQ, or of `store-int8-weights`' decoding
    if not value.uses():
        return None
    array = value.const_value.numpy()
    return float16_copy(array) if array.size >= MIN_ELEMENTS else None


class StoreFloat16WeightsPass(ir.passes.InPlacePass):
    """float32 initializers -> a float16 initializer and a Cast (every graph), in a model that was float16;
    in any model, those `choose-int8-storage` marked (`FLOAT16_STORAGE_KEY`)."""

    name = "store-float16-weights"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        was_float16 = model.meta.get(UPCAST_FLOAT16_KEY)  # else a weight is float32 unless marked
        for graph in list(all_graphs(model)):
            for value in list(graph.initializers.values()):
                if not (was_float16 or value.meta.get(FLOAT16_STORAGE_KEY)):
                    continue
                if (half := _stored_float16(value)) is None:
                    continue
                name = value.name
                stored = register_constant(graph, f"{name}.float16", half)
                cast = ir.node("Cast", [stored], attributes={"to": ir.DataType.FLOAT}, name=f"{name}.to_float32")
                value.replace_all_uses_with(cast.outputs[0])
                del graph.initializers[name]
                cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, value.dtype, value.shape
                graph.insert_before(graph.node(0), cast)
                modified = True
        return ir.passes.PassResult(model, modified=modified)
