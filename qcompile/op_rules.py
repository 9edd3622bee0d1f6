"""Which inputs of which ops are quantized, as data (DESIGN.md: shared constraints are explicit specs).

* COMPUTE ops are what quantization is for: their activation inputs and constant weight are always
  quantized (unless excluded).
* SHARED ops move values without computing new ones (Reshape, Transpose, MaxPool, Concat, ...): their
  data inputs and output share one quantization spec, so a runtime can run them on integers.
* ELEMENTWISE ops (Add, Mul of two activations: residual adds) have their own specs.
* Relu and Clip are not quantized on their input: Q/DQ goes on their output only, so a
  Conv -> Clip -> next op chain has no quantization step between the Conv and the Clip. With the
  output's zero point at the clip minimum, QuantizeLinear's saturation is the clip, and ONNX Runtime
  removes the Clip and fuses the Conv into a QLinearConv.

Compute ops quantize only inputs that depend on the inputs' contents: positions computed from shapes
alone (Shape -> Range -> MatMul for RoPE's angles) stay float (`data_dependent_values`).

Non-compute ops are quantized only where their output feeds a quantized op: a Reshape in front of a
LayerNormalization stays float, so quantization error is added only where it buys integer compute.

The exception buys integer compute too: a quantized Conv's output is quantized even where the op
that reads it is not (LeakyRelu, HardSwish, Sigmoid, ...). ONNX Runtime has no integer Conv with a
float output, so without that Q it runs the Conv in float with its weight dequantized on every call,
slower than the fp32 model. MatMul and Gemm have float-output integer kernels and need no such Q.
"""
from __future__ import annotations

import onnx_ir as ir

from qcompile.decisions import QUANT_SPEC_KEY, IntegerGrid, PerAxis, QuantSpec

# QuantizeLinear / DequantizeLinear exist from opset 10, and take 16-bit integers from opset 21.
MIN_OPSET_QDQ = 10
MIN_OPSET_16BIT_QDQ = 21
# DequantizeLinear with `block_size` (and 4-bit types) from opset 21.
BLOCK_DEQUANTIZE_OPSET = 21


def qdq_missing_note(model) -> str | None:
    """A report note where the model's opset has no QuantizeLinear / DequantizeLinear (the version
    converter could not raise it), else None."""
    opset = model.opset_imports.get("", 1)
    if opset >= MIN_OPSET_QDQ:
        return None
    return (f"opset {opset} has no QuantizeLinear/DequantizeLinear (opset {MIN_OPSET_QDQ} has): every layer computes "
            f"in float")

# op type -> indexes of the activation inputs that get Q/DQ
COMPUTE_OPS: dict[str, tuple[int, ...]] = {
    "Conv": (0,),
    "ConvTranspose": (0,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
}
SHARED_OPS: dict[str, tuple[int, ...]] = {
    "Reshape": (0,),
    "Transpose": (0,),
    "Flatten": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "MaxPool": (0,),
    "Slice": (0,),
    "Resize": (0,),
    "GlobalAveragePool": (0,),
    "AveragePool": (0,),
    "Concat": (),  # every input: filled in by `quantized_inputs`
}
ELEMENTWISE_OPS: dict[str, tuple[int, ...]] = {"Add": (0, 1), "Mul": (0, 1)}
# Compute ops whose integer kernel needs a quantized output, and the ops its output grid can absorb.
QUANTIZED_OUTPUT_OPS = ("Conv",)
CLIPS = ("Relu", "Clip")


def candidate_inputs(op_type: str, num_inputs: int) -> tuple[int, ...]:
    """Input slots of a standard-domain op that may carry quantized activations."""
    if op_type == "Concat":
        return tuple(range(num_inputs))
    for table in (COMPUTE_OPS, SHARED_OPS, ELEMENTWISE_OPS):
        if op_type in table:
            return tuple(i for i in table[op_type] if i < num_inputs)
    return ()


def weight_axis(node: ir.Node) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1), or None if it is not a weighted op."""
    if node.domain != "":
        return None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.shape is None:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul" and weight.shape.rank() >= 2:
        return weight.shape.rank() - 1
    return None


def reduction_axis(node: ir.Node) -> int | None:
    """The axis of ``node``'s 2-D weight (input 1) that the product sums over, or None where
    ``node`` is not a MatMul / Gemm of that kind."""
    if node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    if weight.shape is None or weight.shape.rank() != 2:
        return None
    if node.op_type == "MatMul":
        return 0
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0) \
            and node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_float("beta", 1.0) == 1.0:
        return 1 if node.attributes.get_int("transB", 0) else 0
    return None


def int8_channel_layers(model: ir.Model) -> list[tuple[ir.Node, int]]:
    """LLM.int8()'s layers: MatMul / Gemm nodes of the main graph whose constant 2-D weight carries a symmetric 8-bit
    spec with one scale per output channel, each with its weight's `reduction_axis`."""
    layers = []
    for node in model.graph:
        axis = reduction_axis(node)
        spec = node.inputs[1].meta.get(QUANT_SPEC_KEY) if axis is not None else None
        if isinstance(spec, QuantSpec) and isinstance(spec.granularity, PerAxis) and spec.granularity.axis != axis \
                and isinstance(spec.grid, IntegerGrid) and spec.grid.bits == 8 and spec.symmetric \
                and node.inputs[1].const_value is not None:
            layers.append((node, axis))
    return layers
