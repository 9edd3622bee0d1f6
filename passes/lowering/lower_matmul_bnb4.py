"""MatMul / Gemm whose weight carries an NF4 block spec -> ONNX Runtime's ``com.microsoft.MatMulBnb4``.

MatMulBnb4 computes ``A @ dequantized(B)^T`` with B the (N, K) weight flattened, two 4-bit code-book indexes per
byte, the even flat index in the high nibble, and ``absmax`` one float per ``block_size`` consecutive flat
elements: with K a multiple of the block, one per block along K of each output column. It takes no 8-bit
absmax: double-quantized ones are decoded in the graph by a block-wise DequantizeLinear (opset 21) and a
Reshape, where the model's opset allows (ONNX Runtime folds that subgraph once, when the session starts);
else they are stored as floats, and the report says so. The report also gives the absmax size both ways.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.decisions import QUANT_SPEC_KEY, CodebookGrid, PerBlock, QuantSpec
from qcompile.graph import register_constant
from qcompile.notes import add_note
from qcompile.op_rules import BLOCK_DEQUANTIZE_OPSET
from qcompile.passes.lowering.lower_matmul_nbits import (CONTRIB_DOMAIN, ensure_lowered, layers_with_spec,
                                                         release_weights, replace_layer)

NF4_QUANT_TYPE = 1  # MatMulBnb4's quant_type: 0 FP4, 1 NF4


def is_code_book_block(spec) -> bool:
    """A block-wise spec on a code book (NF4)."""
    return (isinstance(spec, QuantSpec) and isinstance(spec.granularity, PerBlock)
            and isinstance(spec.grid, CodebookGrid))


def pack_high_first(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (flat, even length) -> bytes, element 2j in the high nibble of byte j."""
    codes = codes.astype(np.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def block_scales(graph: ir.Graph, weight: ir.Value, before: ir.Node, transposed: bool,
                 double_quantized: bool = True) -> ir.Value:
    """The float block scales of ``weight``'s spec as a graph value, laid out (N, k_blocks) if ``transposed``,
    else as the spec holds them: an initializer, or for double-quantized scales (unless not
    ``double_quantized``) the DequantizeLinear of their 8-bit levels, inserted before ``before``."""
    spec: QuantSpec = weight.meta[QUANT_SPEC_KEY]
    flip = np.transpose if transposed else np.asarray
    scale_spec = spec.granularity.scale_spec
    if scale_spec is None or not double_quantized:
        return register_constant(graph, f"{weight.name}_absmax", flip(spec.stored_scale()).astype(np.float32))
    levels = register_constant(graph, f"{weight.name}_absmax_8bit", flip(scale_spec.quantize(spec.scale)))
    scale = register_constant(graph, f"{weight.name}_absmax_scale", flip(scale_spec.scale))
    zero_point = register_constant(graph, f"{weight.name}_absmax_zero_point", flip(scale_spec.zero_point))
    axis = 1 - scale_spec.axis if transposed else scale_spec.axis
    dequantize = ir.node("DequantizeLinear", [levels, scale, zero_point],
                         {"axis": axis, "block_size": scale_spec.block_size}, name=f"{weight.name}_absmax_dequantize")
    dequantize.outputs[0].name = f"{weight.name}_absmax"
    graph.insert_before(before, dequantize)
    return dequantize.outputs[0]


def scale_bytes(spec: QuantSpec) -> tuple[int, int]:
    """Bytes of ``spec``'s block scales stored in 8 bits (with their own scales and zero points), and as floats."""
    scale_spec = spec.granularity.scale_spec
    as_float = spec.scale.size * 4
    return (as_float if scale_spec is None else spec.scale.size + scale_spec.scale.size * 5), as_float


class LowerMatMulBnb4Pass(ir.passes.InPlacePass):
    """Replace each MatMul / Gemm on an NF4-quantized weight by a MatMulBnb4 (and a Gemm's bias Add)."""

    name = "lower-matmul-bnb4"

    def ensures(self, model: ir.Model) -> None:
        ensure_lowered(model, is_code_book_block, "NF4 specs")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        double_quantized = model.opset_imports.get("", 1) >= BLOCK_DEQUANTIZE_OPSET
        lowered: dict[ir.Value, list[ir.Value]] = {}  # weight -> MatMulBnb4's B and absmax
        attributes: dict[ir.Value, dict] = {}
        stored, as_float, undecoded = 0, 0, 0
        for node, weight in layers_with_spec(graph, is_code_book_block):
            if weight not in lowered:
                spec: QuantSpec = weight.meta[QUANT_SPEC_KEY]
                axis = spec.granularity.axis
                codes = spec.quantize(weight.const_value.numpy())
                rows = codes.T if axis == 0 else codes  # (N, K)
                scales = block_scales(graph, weight, node, transposed=axis == 0, double_quantized=double_quantized)
                shape = register_constant(graph, f"{weight.name}_absmax_shape", np.array([-1], np.int64))
                flat = ir.node("Reshape", [scales, shape], name=f"{weight.name}_absmax_flat")
                graph.insert_before(node, flat)
                lowered[weight] = [register_constant(graph, f"{weight.name}_nf4", pack_high_first(rows.reshape(-1))),
                                   flat.outputs[0]]
                attributes[weight] = {"K": rows.shape[1], "N": rows.shape[0], "block_size": spec.block_size,
                                      "quant_type": NF4_QUANT_TYPE}
                eight_bit, floats = scale_bytes(spec)
                stored, as_float = stored + (eight_bit if double_quantized else floats), as_float + floats
                undecoded += spec.granularity.scale_spec is not None and not double_quantized
            replace_layer(graph, node, "MatMulBnb4", lowered[weight], attributes[weight])
        release_weights(graph, lowered)
        if lowered:
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
            add_note(model, f"{len(lowered)} NF4 weight(s) in MatMulBnb4: block scales {stored / 1e6:.2f} MB as "
                     f"stored, {as_float / 1e6:.2f} MB as floats. ONNX Runtime's CPU kernel for it is slower than "
                     f"fp32 (SmolLM2, AMD EPYC with VNNI: 1.0-1.2x at 128 tokens, 1.5-2.4x at one token; its own "
                     f"NF4 quantizer's output the same): w4a16-rtn runs 0.7-0.9x and 0.3x, and NF4 on qcompile's "
                     f"kernel (--option kernel=custom, int8 activations: +1.6-1.9% perplexity) 1.1-1.2x and 0.45x")
        if undecoded:
            add_note(model, f"{undecoded} NF4 weight(s) with float block scales, not 8-bit: the model's opset is below "
                     f"{BLOCK_DEQUANTIZE_OPSET}, whose DequantizeLinear decodes them")
        return ir.passes.PassResult(model, modified=bool(lowered))
