"""MatMul / Gemm whose weight carries a symmetric INT8 per-output-channel spec -> qcompile's
``ai.qcompile.OutlierSplitMatMul`` (LLM.int8(), `qcompile.ops.outlier_split_matmul`), or its computation in
standard ONNX ops (``decomposed``: portable, TensorRT).

For the op the weight is stored as it takes it: its levels + 128 as uint8, one row of K per output channel, and
the channel scales; the activations' outlier columns are found at run time by ``threshold``, or, where
`choose-outlier-columns` fixed them on calibration data (`OUTLIER_COLUMNS_KEY` on the layer's input), given. The model's
metadata names the library it needs. Decomposed, the weight stays INT8 (K, N) in the file, decoded by Cast and
Mul (ONNX Runtime folds them when the session starts; a DequantizeLinear in front of the MatMul would be fused
with it at ONNX Runtime's default optimization level into an integer op that quantizes the activations again:
1.2% of the output off on a test layer), and the op's arithmetic is spelled out as
`outlier_split_matmul.decomposed_model` does (the outliers and the rows taken back to float are added before one
MatMul). A Gemm's bias follows as an Add; a weight
several layers read is stored once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile import kernels
from qcompile.decisions import OUTLIER_COLUMNS_KEY, QUANT_SPEC_KEY
from qcompile.graph import register_constant
from qcompile.op_rules import int8_channel_layers
from qcompile.ops import outlier_split_matmul
from qcompile.passes.lowering.lower_matmul_nbits import release_weights, replace_layer


# the model's metadata where it needs qcompile's library
CUSTOM_OPS = f"{outlier_split_matmul.DOMAIN}: {outlier_split_matmul.OP_TYPE}"


@dataclass(frozen=True)
class OutlierSplitOptions:
    threshold: float = outlier_split_matmul.DEFAULT_THRESHOLD
    decomposed: bool = False  # standard ONNX ops instead of qcompile's op


class LowerOutlierSplitMatMulPass(ir.passes.InPlacePass):
    """Replace each MatMul / Gemm on an INT8 per-channel weight by an OutlierSplitMatMul, or its standard-ONNX form
    (and a Gemm's bias Add)."""

    name = "lower-outlier-split-matmul"

    def __init__(self, options: OutlierSplitOptions = OutlierSplitOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stored: dict[ir.Value, tuple[list[ir.Value], int, int]] = {}  # weight -> its op inputs, K, N
        fixed: dict[ir.Value, ir.Value] = {}  # layer input -> its outlier columns, where fixed
        layers = int8_channel_layers(model)
        layer_inputs = [node.inputs[0] for node, _ in layers]
        for node, axis in layers:
            weight, x = node.inputs[1], node.inputs[0]
            if weight not in stored:
                stored[weight] = (_dequantized if self.options.decomposed else _initializers)(graph, weight, axis)
            inputs, k, n = stored[weight]
            columns = x.meta.get(OUTLIER_COLUMNS_KEY)
            if self.options.decomposed:
                _replace_decomposed(graph, node, inputs[0], k, n, self.options.threshold, columns)
                continue
            if columns is not None and x not in fixed:
                fixed[x] = register_constant(graph, f"{x.name}_outlier_columns", columns.astype(np.int64))
            replace_layer(graph, node, outlier_split_matmul.OP_TYPE, [*inputs, *([fixed[x]] if x in fixed else [])],
                          {"K": k, "N": n, "threshold": float(self.options.threshold)}, outlier_split_matmul.DOMAIN)
        for x in layer_inputs:
            x.meta.pop(OUTLIER_COLUMNS_KEY, None)
        release_weights(graph, stored)
        if stored and not self.options.decomposed:
            model.opset_imports.setdefault(outlier_split_matmul.DOMAIN, 1)
            model.metadata_props[kernels.METADATA_KEY] = CUSTOM_OPS
        return ir.passes.PassResult(model, modified=bool(stored))


def _initializers(graph: ir.Graph, weight: ir.Value, axis: int) -> tuple[list[ir.Value], int, int]:
    spec = weight.meta[QUANT_SPEC_KEY]
    levels = spec.quantize(weight.const_value.numpy()).astype(np.int16)
    if axis == 0:  # (K, N) -> one row per output channel
        levels = levels.T
    n, k = levels.shape
    stored = (levels + 128).astype(np.uint8)
    scales = np.asarray(spec.stored_scale(), np.float32).reshape(n)
    return [register_constant(graph, f"{weight.name}_int8", stored),
            register_constant(graph, f"{weight.name}_scales", scales)], k, n


def _dequantized(graph: ir.Graph, weight: ir.Value, axis: int) -> tuple[list[ir.Value], int, int]:
    """The weight as INT8 (K, N) and its channel scales, and the float (K, N) Cast and Mul make of them."""
    spec = weight.meta[QUANT_SPEC_KEY]
    levels = spec.quantize(weight.const_value.numpy()).astype(np.int8)
    if axis == 1:  # (N, K), a Gemm's transposed weight -> (K, N)
        levels = levels.T
    k, n = levels.shape
    scales = np.asarray(spec.stored_scale(), np.float32).reshape(1, n)
    cast = ir.node("Cast", [register_constant(graph, f"{weight.name}_int8", levels)], {"to": ir.DataType.FLOAT},
                   name=f"{weight.name}_cast")
    decode = ir.node("Mul", [cast.outputs[0], register_constant(graph, f"{weight.name}_scales", scales)],
                     name=f"{weight.name}_decode")
    first = next(iter(graph))
    graph.insert_before(first, [cast, decode])
    return [decode.outputs[0]], k, n


def _replace_decomposed(graph: ir.Graph, node: ir.Node, weight: ir.Value, k: int, n: int, threshold: float,
                        columns: np.ndarray | None) -> None:
    """``node`` (MatMul / Gemm) as `outlier_split_matmul.decomposed_model` computes it, on the float ``weight``;
    ``columns``: the outlier features, fixed, else found by ``threshold``."""
    name = node.name or node.outputs[0].name
    new: list[ir.Node] = []

    def op(op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        new.append(ir.node(op_type, list(inputs), attributes, name=f"{name}_{op_type.lower()}_{len(new)}"))
        return new[-1].outputs[0]

    def const(label: str, array) -> ir.Value:
        return register_constant(graph, f"{name}_{label}", np.asarray(array))

    opset = graph.opset_imports.get("", 0)

    def reduce_max(x: ir.Value, axis: int) -> ir.Value:  # axes: an input from opset 18, an attribute before
        if opset >= 18:
            return op("ReduceMax", x, const(f"axis{axis}", np.array([axis], np.int64)), keepdims=1)
        return op("ReduceMax", x, axes=[axis], keepdims=1)

    zero, top = const("zero", np.float32(0)), const("top", np.float32(127))
    rows = op("Reshape", node.inputs[0], const("rows_shape", np.array([-1, k], np.int64)))
    if columns is None:
        outlier = op("Greater", reduce_max(op("Abs", rows), 0), const("threshold", np.float32(threshold)))
    else:
        mask = np.zeros((1, k), bool)
        mask[0, columns] = True
        outlier = const("outliers", mask)
    rest = op("Where", outlier, zero, rows)
    amax = reduce_max(op("Abs", rest), 1)
    inverse = op("Where", op("Greater", amax, zero), op("Div", top, amax), zero)
    levels = op("Clip", op("Round", op("Mul", rest, inverse)), const("bottom", np.float32(-127)), top)
    rows_back = op("Add", op("Mul", levels, op("Div", amax, top)), op("Where", outlier, rows, zero))
    product = op("MatMul", rows_back, weight)
    leading = op("Slice", op("Shape", node.inputs[0]), const("start", np.array([0], np.int64)),
                 const("end", np.array([-1], np.int64)))
    output = op("Reshape", product, op("Concat", leading, const("n", np.array([n], np.int64)), axis=0))
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        output = op("Add", output, bias)
    original = node.outputs[0]
    output.type, output.shape = original.type, original.shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, [original], [output])
