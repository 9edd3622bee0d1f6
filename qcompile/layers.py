"""What precision each layer of a model runs at, read off the graph itself."""
from __future__ import annotations

import onnx_ir as ir

from qcompile.decisions import CODE_BOOK_KEY, FLOAT_REASON_KEY
from qcompile.graph import all_nodes

RECURRENT_OPS = ("LSTM", "GRU", "RNN")

WEIGHTED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QLinearConv",
                "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulBnb4",
                "BlockQuantMatMul", "OutlierSplitMatMul", *RECURRENT_OPS}
# Ops storing their weight as MatMulNBits does (`_nbits_precision`).
NBITS_OPS = ("MatMulNBits", "BlockQuantMatMul")
DEQUANTIZE_OPS = {"DequantizeLinear"}
# Ops that take (a, a_scale, a_zero_point, b, ...): their weight is input 3; every other op's is input 1.
QLINEAR_WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3}


def decoded_integer(value: ir.Value) -> ir.Value | None:
    """The integer tensor ``value`` is decoded from: a DequantizeLinear's input, or the stored INT8 in
    `store-int8-weights`' Mul(Cast(int8 constant), constant scale) (not an image's Cast(uint8) -> Mul)."""
    producer = value.producer()
    if producer is None or not producer.inputs or producer.inputs[0] is None:
        return None
    if producer.op_type in DEQUANTIZE_OPS:
        return producer.inputs[0]
    cast = producer.inputs[0].producer() if producer.op_type == "Mul" and len(producer.inputs) == 2 else None
    if cast is None or cast.op_type != "Cast" or producer.inputs[1] is None or producer.inputs[1].const_value is None:
        return None
    stored = cast.inputs[0]
    is_int8_constant = stored is not None and stored.const_value is not None and stored.dtype == ir.DataType.INT8
    return stored if is_int8_constant else None


def _code_book(value: ir.Value) -> str | None:
    """The code book a weight is decoded from (`dequantize-code-book-weights` marks the decoding node)."""
    producer = value.producer()
    return producer.metadata_props.get(CODE_BOOK_KEY) if producer is not None else None


def _operand_precision(value: ir.Value | None) -> str:
    if value is not None and (book := _code_book(value)) is not None:
        return book
    if value is not None and (integer := decoded_integer(value)) is not None:
        return integer.dtype.name.lower() if integer.dtype is not None else "?"
    if value is None or value.dtype is None:
        return "?"
    return {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}.get(
        value.dtype, value.dtype.name.lower())


# Ops through which a stored weight reaches its layer (besides those `decoded_integer` reads).
WEIGHT_PATH_OPS = {"Transpose", "Reshape", "Cast"}


def _stored(value: ir.Value) -> bool:
    """Whether ``value`` is a constant, possibly decoded, transposed or reshaped: a weight, not an activation."""
    while value.const_value is None and value.producer() is not None:
        if _code_book(value) is not None:
            return True
        if (integer := decoded_integer(value)) is not None:
            value = integer
            continue
        producer = value.producer()
        if producer.op_type == "Constant":
            return True
        if producer.op_type not in WEIGHT_PATH_OPS or not producer.inputs or producer.inputs[0] is None:
            return False
        value = producer.inputs[0]
    return value.const_value is not None


def _float_by_nature(node: ir.Node, model: ir.Model) -> str | None:
    if node.op_type in RECURRENT_OPS:
        return f"{node.op_type}: ONNX has no integer recurrent op, so it computes in float"
    if node.graph is not model.graph:
        return "in a control-flow subgraph: only the main graph is quantized"
    return None


def _nbits_precision(node: ir.Node) -> str:
    """MatMulNBits' weight is packed bytes: its levels are ``bits`` wide, signed where no zero points are given
    (the default zero point is the middle level); a BlockQuantMatMul's on a code book is named after it."""
    if (book := node.metadata_props.get(CODE_BOOK_KEY)) is not None:
        return book
    zero_points = len(node.inputs) > 3 and node.inputs[3] is not None
    return f"{'u' if zero_points else ''}int{node.attributes.get_int('bits', 4)}"


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
        if node.op_type == "BlockQuantMatMul":
            activation = "int8-blocks"  # quantized per block at run time
        if node.op_type == "OutlierSplitMatMul":
            activation = "int8-rows+fp32-outliers"
        weight_input = QLINEAR_WEIGHT_INPUT.get(node.op_type, 1)
        operand = node.inputs[weight_input] if len(node.inputs) > weight_input else None
        if node.op_type == "MatMulBnb4":
            weight = {0: "fp4", 1: "nf4"}.get(node.attributes.get_int("quant_type", 1), "?")
        elif node.op_type == "OutlierSplitMatMul":
            weight = "int8"  # stored + 128
        else:
            weight = _nbits_precision(node) if node.op_type in NBITS_OPS else _operand_precision(operand)
        precision = (f"a:{activation} x a:{weight}" if operand is not None and not _stored(operand)
                     else f"w:{weight} a:{activation}")
        row = {"name": node.name, "op_type": node.op_type, "precision": precision}
        if activation.startswith(("fp", "bf")) and _stored(operand):
            row["why"] = node.meta.get(FLOAT_REASON_KEY) or _float_by_nature(node, model)
        rows.append(row)
    return rows
