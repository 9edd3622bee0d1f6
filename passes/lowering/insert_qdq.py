"""Put a QuantizeLinear -> DequantizeLinear pair on each activation that carries a `QuantSpec`."""
from __future__ import annotations

import onnx_ir as ir

from qcompile.passes.analysis.select_quantized_ops import QUANTIZED_INPUTS_KEY
from qcompile.graph import register_constant
from qcompile.quant_spec import QUANT_SPEC_KEY


class InsertQDQPass(ir.passes.InPlacePass):
    """One Q/DQ pair per tensor, right after its producer; only the consumers that quantize that input
    read the dequantized value, the others keep reading the float tensor."""

    name = "insert-qdq"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = [v for v in graph.inputs if QUANT_SPEC_KEY in v.meta]
        values += [v for node in graph for v in node.outputs if QUANT_SPEC_KEY in v.meta]
        first = next(iter(graph), None)
        for value in values:
            spec = value.meta.pop(QUANT_SPEC_KEY)
            consumers = [(user, i) for user, i in value.uses()
                         if user.graph is graph and i in user.meta.get(QUANTIZED_INPUTS_KEY, ())]
            if not consumers:
                continue
            scale = register_constant(graph, f"{value.name}_scale", spec.scale)
            zero_point = register_constant(graph, f"{value.name}_zero_point", spec.zero_point)
            quantize = ir.node("QuantizeLinear", [value, scale, zero_point], name=f"{value.name}_quantize")
            quantize.outputs[0].name = f"{value.name}_quantized"
            quantize.outputs[0].type = ir.TensorType(spec.dtype)
            quantize.outputs[0].shape = value.shape
            dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero_point],
                                 name=f"{value.name}_dequantize")
            dequantize.outputs[0].name = f"{value.name}_dequantized"
            dequantize.outputs[0].type = value.type
            dequantize.outputs[0].shape = value.shape
            producer = value.producer()
            if producer is None:
                graph.insert_before(first, [quantize, dequantize])
            else:
                graph.insert_after(producer, [quantize, dequantize])
            for user, i in consumers:
                user.replace_input_with(i, dequantize.outputs[0])
        return ir.passes.PassResult(model, modified=bool(values))
