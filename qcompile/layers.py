"""What precision each layer of a model runs at, read off the graph itself."""
from __future__ import annotations

import onnx_ir as ir

from qcompile.decisions import FLOAT_REASON_KEY
from qcompile.graph import all_nodes

WEIGHTED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QLinearConv",
                "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulBnb4"}
DEQUANTIZE_OPS = {"DequantizeLinear"}
# Ops that take (a, a_scale, a_zero_point, b, ...): their weight is input 3; every other op's is input 1.
QLINEAR_WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3}


def _operand_precision(value: ir.Value | None) -> str:
    if value is None or value.dtype is None:
        return "?"
    producer = value.producer()
    if producer is not None and producer.op_type in DEQUANTIZE_OPS and producer.inputs[0] is not None:
        stored = producer.inputs[0].dtype
        return stored.name.lower() if stored is not None else "?"
    return {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}.get(
        value.dtype, value.dtype.name.lower())


# Ops through which a stored weight reaches its layer.
WEIGHT_PATH_OPS = DEQUANTIZE_OPS | {"Transpose", "Reshape", "Cast"}


def _stored(value: ir.Value) -> bool:
    """Whether ``value`` is a constant, possibly dequantized, transposed or reshaped: a weight, not an activation."""
    while value.const_value is None and value.producer() is not None:
        producer = value.producer()
        if producer.op_type == "Constant":
            return True
        if producer.op_type not in WEIGHT_PATH_OPS or not producer.inputs or producer.inputs[0] is None:
            return False
        value = producer.inputs[0]
    return value.const_value is not None


def layer_precisions(model: ir.Model) -> list[dict]:
    """One row per weighted layer: name, op type, and the precision of its activation and weight
    ("a:... x a:..." for a product of two activations, such as attention's)."""
    rows = []
    for node in all_nodes(model):
        if node.op_type not in WEIGHTED_OPS:
            continue
        activation = _operand_precision(node.inputs[0]) if node.inputs else "?"
        producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if node.op_type == "DynamicQuantizeMatMul" or (producer and producer.op_type == "DynamicQuantizeLinear"):
            activation = "uint8-dynamic"
        weight_input = QLINEAR_WEIGHT_INPUT.get(node.op_type, 1)
        operand = node.inputs[weight_input] if len(node.inputs) > weight_input else None
        weight = _operand_precision(operand)
        precision = (f"a:{activation} x a:{weight}" if operand is not None and not _stored(operand)
                     else f"w:{weight} a:{activation}")
        row = {"name": node.name, "op_type": node.op_type, "precision": precision}
        if weight.startswith(("fp", "bf")) and _stored(operand):
            row["why"] = node.meta.get(FLOAT_REASON_KEY) or (
                "in a control-flow subgraph: only the main graph is quantized" if node.graph is not model.graph
                else None)
        rows.append(row)
    return rows
