"""MatMul / Gemm whose weight carries an NF4 block spec -> qcompile's ``ai.qcompile.BlockQuantMatMul`` with a code
book (`qcompile.ops.block_quant_matmul`, the library `qcompile kernels build` makes).

The 4-bit indexes are packed as MatMulNBits packs levels ((N, k_blocks, block_size / 2), the first in the low
nibble); the code book goes in as int8 levels, ``rint(127 * value / max|value|)`` (NF4's ±1 become ±127, every
value within 0.4% of a block's absmax of its float one), and the block scales multiplied by 1 / 127 to match.
Double-quantized absmax values stay 8-bit: their levels, and their own scales (times 1 / 127) and zero points,
which the kernels decode as they read each column, so no float copy of the scales exists. Activations are
quantized to int8 per block, as `BlockQuantMatMul` always does. Blocks it does not take (below 32: NF4's shrunk
to divide K) are left to `lower-matmul-bnb4`.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile import kernels
from qcompile.decisions import CODE_BOOK_KEY, QUANT_SPEC_KEY, QuantSpec
from qcompile.graph import register_constant
from qcompile.notes import add_note
from qcompile.ops import block_quant_matmul
from qcompile.passes.lowering.lower_matmul_bnb4 import is_code_book_block, scale_bytes
from qcompile.passes.lowering.lower_matmul_nbits import (ensure_lowered, layers_with_spec, pack_nibbles,
                                                         release_weights, replace_layer)

LEVELS = 127  # the code book's largest |level|


def _lowered_here(spec) -> bool:
    return is_code_book_block(spec) and spec.block_size in block_quant_matmul.BLOCK_SIZES


def int8_code_book(values: tuple[float, ...]) -> tuple[np.ndarray, float]:
    """A code book's values as int8 levels, and the float one level stands for."""
    step = max(abs(v) for v in values) / LEVELS
    return np.rint(np.asarray(values, np.float64) / step).astype(np.int8), step


def packed_inputs(weight: np.ndarray, spec: QuantSpec) -> tuple[dict[str, np.ndarray | None], dict]:
    """``weight`` (2-D) on ``spec``'s code book as BlockQuantMatMul's inputs after A (by name) and attributes."""
    axis = spec.granularity.axis
    codes = spec.quantize(weight)
    flip = np.transpose if axis == 0 else np.asarray  # -> one row per output column
    rows = flip(codes)
    n, k = rows.shape
    block_size = spec.block_size
    assert k % block_size == 0, "an NF4 block divides K"
    book, step = int8_code_book(spec.grid.values)
    data = pack_nibbles(rows.reshape(n, k // block_size, block_size))
    scale_spec = spec.granularity.scale_spec
    if scale_spec is None:
        scales = (flip(spec.stored_scale()) * step).astype(np.float32).reshape(-1)
    else:
        scales = block_quant_matmul.EightBitScales(
            flip(scale_spec.quantize(spec.scale)).astype(np.uint8).reshape(-1),
            (flip(scale_spec.scale) * step).astype(np.float32).reshape(-1),
            flip(scale_spec.zero_point).astype(np.uint8).reshape(-1), scale_spec.block_size)
    inputs, attributes = block_quant_matmul.weight_inputs(data, scales, None, book)
    return inputs, {"K": k, "N": n, "bits": 4, "block_size": block_size, **attributes}


class LowerCodeBookMatMulPass(ir.passes.InPlacePass):
    """Replace each MatMul / Gemm on an NF4-quantized weight by a BlockQuantMatMul with its code book (and a Gemm's
    bias Add)."""

    name = "lower-code-book-matmul"

    def ensures(self, model: ir.Model) -> None:
        ensure_lowered(model, _lowered_here, "NF4 specs in blocks of 32 to 256")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered: dict[ir.Value, tuple[list[ir.Value], dict]] = {}  # weight -> its op inputs after A, attributes
        stored, as_float = 0, 0
        for node, weight in layers_with_spec(graph, _lowered_here):
            spec = weight.meta[QUANT_SPEC_KEY]
            if weight not in lowered:
                inputs, attributes = packed_inputs(weight.const_value.numpy(), spec)
                values = [None if value is None else register_constant(graph, f"{weight.name}_{name}", value)
                          for name, value in inputs.items()]
                while values[-1] is None:
                    values.pop()
                lowered[weight] = values, attributes
                eight_bit, floats = scale_bytes(spec)
                stored, as_float = stored + eight_bit, as_float + floats
            op = replace_layer(graph, node, block_quant_matmul.OP_TYPE, *lowered[weight], block_quant_matmul.DOMAIN)
            op.metadata_props[CODE_BOOK_KEY] = spec.grid.name  # `inspect` names the layer's weights after it
        release_weights(graph, lowered)
        if lowered:
            model.opset_imports.setdefault(block_quant_matmul.DOMAIN, 1)
            model.metadata_props[kernels.METADATA_KEY] = f"{block_quant_matmul.DOMAIN}: {block_quant_matmul.OP_TYPE}"
            add_note(model, f"{len(lowered)} NF4 weight(s) in qcompile's BlockQuantMatMul: the code book as int8 "
                     f"levels (within 0.4% of a block's absmax of NF4's values), activations int8 per block; block "
                     f"scales {stored / 1e6:.2f} MB as stored, {as_float / 1e6:.2f} MB as floats")
        return ir.passes.PassResult(model, modified=bool(lowered))
