"""Decide 4-bit block-wise specs for the constant weights of MatMul and Gemm (weight-only INT4, round to nearest).

A layer that writes a model output itself (an LM head) may get 8 bits instead (``head_bits``): a 4-bit head
costs small LMs most (SmolLM2-135M, symmetric blocks of 32, embedding table float: perplexity 40.9 with a
4-bit head, 37.4 with an 8-bit one, fp32 30.6; ONNX Runtime's quantizer, leaving the tied head float: 37.3).

Each weight gets one scale (and, asymmetric, one zero point) per ``block_size`` consecutive values along K,
the axis the product sums over, for every output column: the layout of ONNX Runtime's `MatMulNBits` and
of opset 21's block-wise DequantizeLinear. K need not be a multiple of the block: the last block is short.

* symmetric: levels -8..7, zero point 0. For MatMulNBits, a block's value of largest magnitude maps to -8
  (scale = that value / -8, as ONNX Runtime's own quantizer does), so all 16 levels are used whichever its
  sign; behind a DequantizeLinear, whose scales other runtimes take positive only, that value maps to -8
  or 7.
* asymmetric: levels 0..15 over the block's [min, max] widened to include 0 (the zero point is an
  integer level).

* NF4 (``nf4``): QLoRA's 16-value code book scaled by each block's largest magnitude (absmax), for the 4-bit
  layers; K must be a multiple of the block (MatMulBnb4 numbers its blocks over the flattened weight): where it
  is not, the largest smaller block that divides K is taken (SmolLM2's K = 576 at 128: 64), and noted. Where ``scale_block`` is given, the absmax values are themselves stored in 8 bits
  (double quantization, as QLoRA does): levels 0..255 over [0, their max] for each ``scale_block`` of them
  along N (QLoRA: 8-bit floats of absmax minus its mean, blocks of 256 over the flattened vector).

A weight that anything but such layers reads (an embedding table's Gather, say) stays float, and so do
weights whose K is shorter than one block; both are noted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.decisions import NF4, QUANT_SPEC_KEY, IntegerGrid, PerBlock, QuantSpec
from qcompile.graph import constant_array, name_matches
from qcompile.op_rules import BLOCK_DEQUANTIZE_OPSET, reduction_axis
from qcompile.notes import add_note, some_names

BLOCK_SIZES = (16, 32, 64, 128, 256)  # powers of two from 16: what MatMulNBits takes
_GRIDS = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4, (8, True): ir.DataType.INT8,
          (8, False): ir.DataType.UINT8}


@dataclass(frozen=True)
class BlockSpecOptions:
    block_size: int = 32
    symmetric: bool = True
    exclude: tuple[str, ...] = ()
    # The weights will be stored behind DequantizeLinear (blocks from opset 21, positive scales), else in
    # MatMulNBits.
    block_dequantize: bool = False
    head_bits: int = 4  # bits of the layers that write a model output (an LM head): 4 or 8
    nf4: bool = False  # the 4-bit layers on the NF4 code book instead of integers
    scale_block: int | None = None  # NF4: absmax values per 8-bit scale (double quantization), None: float


def block_spec(weight: np.ndarray, axis: int, block_size: int, symmetric: bool,
               negative_scales: bool = True, bits: int = 4) -> QuantSpec:
    """Round-to-nearest ``bits``-bit (4 or 8) spec of ``weight`` (2-D) in blocks of ``block_size`` along ``axis``."""
    blocks = blocks_of(weight.astype(np.float64), axis, block_size)
    grid = IntegerGrid(_GRIDS[bits, symmetric])
    lo, hi = grid.bounds
    if symmetric:
        extreme = np.take_along_axis(blocks, np.nanargmax(np.abs(blocks), axis=-1)[..., None], axis=-1)[..., 0]
        if negative_scales:
            scale = extreme / lo
        else:
            scale = np.where(extreme < 0, extreme / lo, extreme / hi)
        scale = np.where(scale != 0, scale, 1.0)
        zero_point = np.zeros(scale.shape, grid.numpy_dtype)
    else:
        low = np.minimum(np.nanmin(blocks, axis=-1), 0.0)
        high = np.maximum(np.nanmax(blocks, axis=-1), 0.0)
        scale = np.where(high > low, (high - low) / (hi - lo), 1.0)
        zero_point = np.clip(np.rint(lo - low / scale), lo, hi).astype(grid.numpy_dtype)
    return QuantSpec(grid, from_blocks(scale, axis).astype(np.float32), from_blocks(zero_point, axis),
                     PerBlock(axis, block_size), symmetric=symmetric, method="rtn")


def nf4_spec(weight: np.ndarray, axis: int, block_size: int, scale_block: int | None) -> QuantSpec:
    """NF4 spec of ``weight`` (2-D, K along ``axis`` a multiple of ``block_size``): each block's absmax as its
    scale, stored in 8 bits per ``scale_block`` along the other axis where that is given."""
    absmax = np.nanmax(np.abs(blocks_of(weight.astype(np.float64), axis, block_size)), axis=-1)
    positive = absmax[absmax > 0]
    # an all-zero block is exact at any scale: take a typical one, not 1.0, which would coarsen the 8-bit scales
    absmax = np.where(absmax > 0, absmax, np.median(positive) if positive.size else 1.0)
    scale = from_blocks(absmax, axis).astype(np.float32)
    scale_spec = None
    if scale_block is not None:
        scale_spec = block_spec(scale, 1 - axis, scale_block, symmetric=False, bits=8)
    return QuantSpec(NF4, scale, np.zeros(scale.shape, np.uint8), PerBlock(axis, block_size, scale_spec),
                     symmetric=True, method="nf4")


def _dividing_block(k: int, block_size: int) -> int | None:
    """The largest block of `BLOCK_SIZES` up to ``block_size`` that divides ``k`` (MatMulBnb4 numbers its blocks
    over the flattened weight: they must not span two columns), or None."""
    return next((b for b in sorted(BLOCK_SIZES, reverse=True) if b <= block_size and k % b == 0), None)


def blocks_of(weight: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``weight`` with ``axis`` moved last, padded with NaN to whole blocks and split into them:
    (..., blocks, block_size)."""
    moved = np.moveaxis(weight, axis, -1)
    length = moved.shape[-1]
    count = -(-length // block_size)
    padded = np.full(moved.shape[:-1] + (count * block_size,), np.nan)
    padded[..., :length] = moved
    return padded.reshape(moved.shape[:-1] + (count, block_size))


def from_blocks(per_block: np.ndarray, axis: int) -> np.ndarray:
    """One value per block, laid out as `blocks_of` left them, -> the weight's layout with ``axis`` in blocks."""
    return np.moveaxis(per_block, -1, axis)


class AssignBlockSpecsPass(ir.passes.InPlacePass):
    """Attach a 4-bit block-wise `QuantSpec` (8-bit for an LM head where asked) to each constant float weight
    that only MatMul / Gemm read."""

    name = "assign-block-specs"

    def __init__(self, options: BlockSpecOptions = BlockSpecOptions()):
        super().__init__()
        if options.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size {options.block_size}: one of {BLOCK_SIZES}")
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        if self.options.block_dequantize and opset < BLOCK_DEQUANTIZE_OPSET:
            add_note(model, f"every weight left float: the model is at opset {opset}, which could not be raised to "
                     f"{BLOCK_DEQUANTIZE_OPSET}, the first whose DequantizeLinear takes blocks")
            return ir.passes.PassResult(model, modified=False)
        shared, short, uneven, with_nan, padded, smaller = [], [], [], [], [], []
        decided = heads = 0
        for node in model.graph:
            axis = reduction_axis(node)
            weight = node.inputs[1] if axis is not None else None
            array = constant_array(weight)
            if array is None or array.dtype != np.float32 or QUANT_SPEC_KEY in weight.meta or self._excluded(node):
                continue
            if not all(reduction_axis(user) == axis and index == 1 and not self._excluded(user)
                       for user, index in weight.uses()):
                if weight.name not in shared:  # noted once, however many layers read it
                    shared.append(weight.name)
                continue
            if array.shape[axis] < self.options.block_size:
                short.append(weight.name)
                continue
            if np.isnan(array).any():
                with_nan.append(weight.name)
            bits = self.options.head_bits if writes_output(weight) else 4
            if self.options.nf4 and bits == 4:
                block = _dividing_block(array.shape[axis], self.options.block_size)
                if block is None:
                    uneven.append(weight.name)
                    continue
                if block != self.options.block_size:
                    smaller.append((weight.name, block))
                weight.meta[QUANT_SPEC_KEY] = nf4_spec(array, axis, block, self.options.scale_block)
            else:
                weight.meta[QUANT_SPEC_KEY] = block_spec(array, axis, self.options.block_size, self.options.symmetric,
                                                         negative_scales=not self.options.block_dequantize, bits=bits)
                if array.shape[axis] % self.options.block_size:
                    padded.append(weight.name)
            heads += bits != 4
            decided += 1
        if shared:
            add_note(model, f"{len(shared)} weight(s) left float: read by other ops than MatMul / Gemm layers "
                     f"(an embedding's Gather, say): {some_names(shared)}")
        if heads:
            add_note(model, f"{heads} layer(s) writing a model output (an LM head) in blocks of "
                     f"{self.options.head_bits} bits")
        if with_nan:
            add_note(model, f"{len(with_nan)} weight(s) hold NaN values, stored as 0: {some_names(with_nan)}")
        if padded:
            add_note(model, f"{len(padded)} weight(s) with K not a multiple of the block of {self.options.block_size}: "
                     f"the last block of each column is short, padded to a whole block where stored: "
                     f"{some_names(padded)}")
        if smaller:
            sizes = ", ".join(map(str, sorted({block for _, block in smaller})))
            add_note(model, f"{len(smaller)} NF4 weight(s) in blocks of {sizes}: K is not a multiple of "
                     f"{self.options.block_size}: {some_names([name for name, _ in smaller])}")
        if uneven:
            add_note(model, f"{len(uneven)} weight(s) left float: K not a multiple of an NF4 block of "
                     f"{BLOCK_SIZES[0]} or more: {some_names(uneven)}")
        if short:
            add_note(model, f"{len(short)} weight(s) left float: K shorter than one block of "
                     f"{self.options.block_size}: {some_names(short)}")
        return ir.passes.PassResult(model, modified=bool(decided))

    def _excluded(self, node: ir.Node) -> bool:
        return name_matches(node.name, self.options.exclude)


def writes_output(weight: ir.Value) -> bool:
    """Whether a layer reading ``weight`` writes a model output itself (an LM head's logits)."""
    return any(user.outputs[0].is_graph_output() for user, _ in weight.uses())
