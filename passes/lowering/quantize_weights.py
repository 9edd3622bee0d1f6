"""Store decided weights as integers behind a DequantizeLinear (weight-only quantization)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import register_constant
from qcompile.decisions import QUANT_SPEC_KEY, DerivedSpec, FloatGrid, PerAxis, PerBlock, QuantSpec


def min_dequantize_opset(spec: QuantSpec) -> int:
    """The first opset whose DequantizeLinear takes ``spec``: per axis from 13, FP8 from 19, blocks and
    4- and 16-bit integers from 21."""
    if isinstance(spec.granularity, PerBlock) or spec.dtype in (ir.DataType.INT4, ir.DataType.UINT4,
                                                                ir.DataType.INT16, ir.DataType.UINT16):
        return 21
    if isinstance(spec.grid, FloatGrid):
        return 19
    return 13 if isinstance(spec.granularity, PerAxis) else 10


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace each float weight that carries a `QuantSpec` with DequantizeLinear(w_q, scale, zero_point).

    A `DerivedSpec` (a bias's) is resolved first, from the final specs it derives from; one that cannot
    be resolved leaves its weight float. Block-wise specs get the DequantizeLinear ``block_size``
    attribute (opset 21).
    """

    name = "quantize-weights"

    def requires(self, model: ir.Model) -> None:
        """Each decided weight's DequantizeLinear exists at the model's opset."""
        opset = model.opset_imports.get("", 1)
        for value in model.graph.initializers.values():
            spec = value.meta.get(QUANT_SPEC_KEY)
            if isinstance(spec, QuantSpec) and opset < min_dequantize_opset(spec):
                raise ir.passes.PreconditionError(
                    f"{value.name}: its {spec.dtype.name} {type(spec.granularity).__name__} spec needs "
                    f"DequantizeLinear of opset {min_dequantize_opset(spec)}, the model has opset {opset}")

    def ensures(self, model: ir.Model) -> None:
        left = [value.name for value in model.graph.initializers.values() if QUANT_SPEC_KEY in value.meta]
        if left:
            raise ir.passes.PostconditionError(f"weights still float with a decided spec: {', '.join(left[:5])}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for value in graph.initializers.values():
            spec = value.meta.get(QUANT_SPEC_KEY)
            if isinstance(spec, DerivedSpec):
                resolved = spec.resolve()
                if resolved is None:
                    del value.meta[QUANT_SPEC_KEY]
                else:
                    value.meta[QUANT_SPEC_KEY] = resolved
        decided = [v for v in graph.initializers.values() if QUANT_SPEC_KEY in v.meta]
        order = {node: i for i, node in enumerate(graph)}
        for weight in decided:
            spec: QuantSpec = weight.meta[QUANT_SPEC_KEY]
            array = weight.const_value.numpy()
            q = register_constant(graph, f"{weight.name}_quantized", spec.quantize(array))
            scale = register_constant(graph, f"{weight.name}_scale", spec.stored_scale().astype(np.float32))
            zero_point = register_constant(graph, f"{weight.name}_zero_point", spec.zero_point)
            attributes = {} if spec.axis is None else {"axis": spec.axis}
            if spec.block_size is not None:
                attributes["block_size"] = spec.block_size
            dq = ir.node("DequantizeLinear", [q, scale, zero_point], attributes, name=f"{weight.name}_dequantize")
            dq.outputs[0].name = f"{weight.name}_dequantized"
            dq.outputs[0].type = weight.type
            dq.outputs[0].shape = weight.shape
            first_user = min((user for user, _ in weight.uses()), key=order.__getitem__)
            graph.insert_before(first_user, dq)
            weight.replace_all_uses_with(dq.outputs[0])
            graph.initializers.pop(weight.name)
        return ir.passes.PassResult(model, modified=bool(decided))

