"""Put a QuantizeLinear -> DequantizeLinear pair on each activation that carries a `QuantSpec`.

Standard Q/DQ take 16-bit integers from opset 21. In an older model, 16-bit pairs go into ONNX
Runtime's com.microsoft domain, which has them (ONNX Runtime >= 1.17), where the target allows it.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile.errors import UsageError
from qcompile.decisions import FLOAT8_TYPES, QUANTIZED_INPUTS_KEY
from qcompile.graph import graph_values, register_constant
from qcompile.notes import add_note
from qcompile.op_rules import MIN_OPSET_16BIT_QDQ
from qcompile.targets import CONTRIB_DOMAIN
from qcompile.decisions import QUANT_SPEC_KEY



@dataclass(frozen=True)
class InsertQDQOptions:
    contrib_16bit: bool = True  # 16-bit Q/DQ in com.microsoft below opset 21; False: a usage error


class InsertQDQPass(ir.passes.InPlacePass):
    """One Q/DQ pair per tensor, right after its producer; only the consumers that quantize that input
    read the dequantized value, the others keep reading the float tensor."""

    name = "insert-qdq"

    def __init__(self, options: InsertQDQOptions = InsertQDQOptions()):
        super().__init__()
        self.options = options

    def requires(self, model: ir.Model) -> None:
        """16-bit pairs below opset 21 only where the target takes com.microsoft's."""
        opset = model.opset_imports.get("", 1)
        if self.options.contrib_16bit or opset >= MIN_OPSET_16BIT_QDQ:
            return
        for value in _decided(model.graph):
            if value.meta[QUANT_SPEC_KEY].dtype == ir.DataType.INT16:
                raise UsageError(f"tensor {value.name}: 16-bit QuantizeLinear/DequantizeLinear need opset "
                                 f"{MIN_OPSET_16BIT_QDQ}, the model has opset {opset} (or use target ort-cpu)")

    def ensures(self, model: ir.Model) -> None:
        if _decided(model.graph):
            raise ir.passes.PostconditionError("an activation kept its QuantSpec without a Q/DQ pair")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = _decided(graph)
        first = next(iter(graph), None)
        float8 = 0
        for value in values:
            spec = value.meta.pop(QUANT_SPEC_KEY)
            float8 += spec.dtype in FLOAT8_TYPES
            consumers = [(user, i) for user, i in value.uses()
                         if user.graph is graph and i in user.meta.get(QUANTIZED_INPUTS_KEY, ())]
            if not consumers:
                continue
            domain = self._domain(model, value, spec.dtype)
            scale = register_constant(graph, f"{value.name}_scale", spec.scale)
            zero_point = register_constant(graph, f"{value.name}_zero_point", spec.zero_point)
            quantize = ir.node("QuantizeLinear", [value, scale, zero_point], domain=domain,
                               name=f"{value.name}_quantize")
            quantize.outputs[0].name = f"{value.name}_quantized"
            quantize.outputs[0].type = ir.TensorType(spec.dtype)
            quantize.outputs[0].shape = value.shape
            dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero_point], domain=domain,
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
        if float8:
            add_note(model, f"{float8} FP8 Q/DQ pairs: ONNX Runtime's CPU has no FP8 kernels and computes them in "
                     f"float, slower than fp32 (SmolLM2 3.8x at 128 tokens, MiniLM 2.3-4.1x, AMD EPYC); TensorRT "
                     f"fuses them into FP8 kernels on GPUs that have them. ONNX Runtime before 1.32 refuses the model "
                     f"at its default optimization level (it fuses FP8 Q/DQ as if INT8): there, open it with "
                     f"GraphOptimizationLevel.ORT_ENABLE_BASIC (qcompile.session does)")
        return ir.passes.PassResult(model, modified=bool(values))

    def _domain(self, model: ir.Model, value: ir.Value, dtype: ir.DataType) -> str:
        if dtype != ir.DataType.INT16 or model.opset_imports.get("", 1) >= MIN_OPSET_16BIT_QDQ:
            return ""
        model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return CONTRIB_DOMAIN


def _decided(graph: ir.Graph) -> list[ir.Value]:
    """The activations (graph inputs and node outputs) that carry a `QuantSpec`."""
    return [v for v in graph_values(graph) if QUANT_SPEC_KEY in v.meta]
