"""``ai.qcompile.BlockQuantMatMul``: activations times a block-quantized weight, on integer dot products.

Its first inputs and attributes are MatMulNBits' (``com.microsoft``), so the lowering that packs for one packs
for the other: ``A`` (..., K) float32 or float16; ``B`` uint8 (N, k_blocks, block_size * bits / 8), the levels
of each output column along K, two 4-bit levels per byte (the first in the low nibble) or one 8-bit level;
``scales`` float32 (N * k_blocks); ``zero_points`` uint8, optional, packed like B (N * ceil(k_blocks * bits / 8)
bytes), else 8 (4 bits) or 128 (8 bits). Attributes ``K``, ``N``, ``bits`` (4, 8), ``block_size`` (32, 64, 128,
256). Output ``Y`` (..., N), A's type (float16 A is computed as float32, Y rounded to float16 at the end). Two
more ways to store the weight (NF4 with QLoRA's double quantization uses both):

- ``code_book`` int8 (16), optional, 4 bits only, no zero points: the stored 4-bit values index it, so the
  weight is ``scale * code_book[index]`` (the kernels take ``code_book + 128`` as unsigned levels, zero point 128).
- 8-bit scales in place of ``scales`` (left out, an empty input name): ``scale_levels`` uint8 (N * k_blocks),
  ``scale_scales`` float32 and ``scale_zero_points`` uint8 (ceil(N / scale_block) * k_blocks each), attribute
  ``scale_block``; block b of column n has the scale ``(scale_levels[n, b] - scale_zero_points[g, b]) *
  scale_scales[g, b]`` with ``g = n // scale_block``, in float32 (`EightBitScales`).

Unlike MatMulNBits' float path, A is quantized too, per row and per block of K (as MatMulNBits does at
``accuracy_level`` 4, and llama.cpp's Q8_0 activations): ``sa = max|a| / 127``, ``qa = rint(a * (127 / max|a|))``
in float32 (ties to even), so a block of zeros is all zeros and a block holding NaN or inf gives NaN. Then

    Y[m, n] = sum_b  sw[n, b] * sa[m, b] * (sum_k qa[m, k] * w[n, k]  -  zp[n, b] * sum_k qa[m, k])

with integer sums (exact) and the blocks added in order in float32, each by one fused multiply-add. The C++
kernels compute exactly this; `reference` is it in numpy (float64 products: within float32 rounding of it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.ops import onnx_graphs

DOMAIN = "ai.qcompile"
OP_TYPE = "BlockQuantMatMul"
BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128, 256)
CODE_BOOK_SIZE = 16
CODE_BOOK_ZERO_POINT = 128  # the unsigned level of a code book's 0


@dataclass(frozen=True)
class EightBitScales:
    """Block scales stored in 8 bits, one scale and zero point of theirs per ``block`` output columns and block
    along K (the module's docstring)."""

    levels: np.ndarray  # uint8 (N * k_blocks,)
    scales: np.ndarray  # float32 (ceil(N / block) * k_blocks,)
    zero_points: np.ndarray  # uint8, as scales
    block: int

    def decode(self, n: int, k_blocks: int) -> np.ndarray:
        """The float32 scales (N * k_blocks,), as the kernels compute them."""
        group = np.arange(n) // self.block
        points = self.zero_points.reshape(-1, k_blocks)[group].astype(np.int32)
        steps = self.scales.reshape(-1, k_blocks)[group].astype(np.float32)
        return ((self.levels.reshape(n, k_blocks).astype(np.int32) - points).astype(np.float32) * steps).reshape(-1)


def float_scales(scales: np.ndarray | EightBitScales, n: int, k_blocks: int) -> np.ndarray:
    """The block scales (N, k_blocks) float32, however stored."""
    if isinstance(scales, EightBitScales):
        return scales.decode(n, k_blocks).reshape(n, k_blocks)
    return scales.reshape(n, k_blocks).astype(np.float32)


def quantize_activations(a: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``a`` (M, K) float32 -> int levels (M, k_blocks, block_size), zero-padded, and scales (M, k_blocks)."""
    m, k = a.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((m, k_blocks * block_size), np.float32)
    padded[:, :k] = a
    blocks = padded.reshape(m, k_blocks, block_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        amax = np.abs(blocks).max(axis=-1)  # NaN where the block holds NaN
        finite = np.isfinite(blocks).all(axis=-1)
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        levels = np.clip(np.rint(blocks * inverse[..., None]), -127, 127)
    levels = np.where(finite[..., None], levels, 0).astype(np.int32)
    scales = np.where(finite, amax / np.float32(127), np.float32(np.nan)).astype(np.float32)
    return levels, scales


def unpack_weight(b: np.ndarray, zero_points: np.ndarray | None, n: int, k_blocks: int, bits: int,
                  block_size: int, code_book: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned levels (N, k_blocks, block_size) (a code book's: its int8 values + 128) and zero points
    (N, k_blocks)."""
    data = b.reshape(n, k_blocks, -1)
    if bits == 4:
        levels = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(n, k_blocks, block_size)
    else:
        levels = data
    if code_book is not None and (bits != 4 or zero_points is not None):
        raise ValueError("a code book takes 4-bit values and no zero points")
    if code_book is not None:
        unsigned = code_book.astype(np.int32) + CODE_BOOK_ZERO_POINT
        return unsigned[levels], np.full((n, k_blocks), CODE_BOOK_ZERO_POINT, np.int32)
    if zero_points is None:
        points = np.full((n, k_blocks), 1 << (bits - 1), np.int32)
    elif bits == 4:
        packed = zero_points.reshape(n, -1)
        points = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]
    else:
        points = zero_points.reshape(n, k_blocks)
    return levels.astype(np.int32), points.astype(np.int32)


def reference(a: np.ndarray, b: np.ndarray, scales: np.ndarray | EightBitScales, zero_points: np.ndarray | None,
              code_book: np.ndarray | None = None, *, K: int, N: int, bits: int, block_size: int) -> np.ndarray:
    """The operator in numpy (see the module's docstring)."""
    if a.dtype == np.float16:
        return reference(a.astype(np.float32), b, scales, zero_points, code_book, K=K, N=N, bits=bits,
                         block_size=block_size).astype(np.float16)
    k_blocks = -(-K // block_size)
    rows = a.reshape(-1, K).astype(np.float32)
    qa, sa = quantize_activations(rows, block_size)
    levels, points = unpack_weight(b, zero_points, N, k_blocks, bits, block_size, code_book)
    dots = np.einsum("mbk,nbk->mnb", qa.astype(np.int64), levels.astype(np.int64))
    dots -= points[None].astype(np.int64) * qa.sum(axis=-1)[:, None, :]
    sw = float_scales(scales, N, k_blocks)
    with np.errstate(invalid="ignore"):
        y = (dots.astype(np.float64) * (sw[None] * sa[:, None, :]).astype(np.float64)).sum(axis=-1)
    return y.astype(np.float32).reshape(*a.shape[:-1], N)


def weight_inputs(b: np.ndarray, scales: np.ndarray | EightBitScales, zero_points: np.ndarray | None,
                  code_book: np.ndarray | None = None) -> tuple[dict[str, np.ndarray | None], dict]:
    """The op's inputs after ``A`` by name, in order (None: left out), and the attributes they add."""
    eight_bit = scales if isinstance(scales, EightBitScales) else None
    inputs = {"B": b, "scales": None if eight_bit else scales, "zero_points": zero_points, "code_book": code_book}
    if eight_bit is None:
        return inputs, {}
    inputs.update(scale_levels=eight_bit.levels, scale_scales=eight_bit.scales, scale_zero_points=eight_bit.zero_points)
    return inputs, {"scale_block": eight_bit.block}


def make_model(b: np.ndarray, scales: np.ndarray | EightBitScales, zero_points: np.ndarray | None,
               code_book: np.ndarray | None = None, *, K: int, N: int, bits: int, block_size: int, opset: int = 21,
               dtype=np.float32):
    """A one-node model (ModelProto): input ``A`` (batch, rows, K) of ``dtype``, output ``Y``, the weight as
    initializers."""
    inputs, attributes = weight_inputs(b, scales, zero_points, code_book)
    return onnx_graphs.one_node_model(OP_TYPE, DOMAIN, inputs,
                                      dict(K=K, N=N, bits=bits, block_size=block_size, **attributes),
                                      K=K, N=N, opset=opset, dtype=dtype)


def decomposed_model(b: np.ndarray, scales: np.ndarray | EightBitScales, zero_points: np.ndarray | None,
                     code_book: np.ndarray | None = None, *, K: int, N: int, bits: int, block_size: int,
                     opset: int = 21):
    """The same computation in standard ONNX ops (`make_model`'s inputs and outputs): A quantized per block by
    ReduceMax / Round / Clip and taken back to float, times the weight dequantized to float32 at build time.
    Equal to the operator up to float32 rounding (its integer sums are exact; here they are float products)."""
    from onnx import helper

    k_blocks = -(-K // block_size)
    padded = k_blocks * block_size
    levels, points = unpack_weight(b, zero_points, N, k_blocks, bits, block_size, code_book)
    sw = float_scales(scales, N, k_blocks)[..., None]
    weight = (sw * (levels - points[..., None]).astype(np.float32)).reshape(N, padded).T.copy()
    constants = {"weight": weight, "shape_blocks": np.array([-1, k_blocks, block_size], np.int64),
                 "shape_rows": np.array([-1, padded], np.int64), "pads": np.array([0, 0, 0, padded - K], np.int64),
                 "rows_k": np.array([-1, K], np.int64), "axes": np.array([-1], np.int64),
                 "n": np.array([N], np.int64), **onnx_graphs.ROUND_TRIP_CONSTANTS}
    nodes = [
        helper.make_node("Reshape", ["A", "rows_k"], ["rows"]),
        helper.make_node("Pad", ["rows", "pads"], ["padded"]),
        helper.make_node("Reshape", ["padded", "shape_blocks"], ["blocks"]),
        *onnx_graphs.int8_round_trip("blocks", "axes", "quantized"),
        helper.make_node("Reshape", ["quantized", "shape_rows"], ["quantized_rows"]),
        helper.make_node("MatMul", ["quantized_rows", "weight"], ["y_rows"]),
        *onnx_graphs.leading_shape_with("n", "y_rows"),
    ]
    return onnx_graphs.model("block_quant_matmul_decomposed", nodes, constants, K=K, N=N, opset=opset)


def random_weight(rng: np.random.Generator, *, K: int, N: int, bits: int, block_size: int, symmetric: bool,
                  code_book: bool = False, scale_block: int | None = None):
    """Random stored levels (never all zeros), scales (8-bit ones in blocks of ``scale_block`` columns where that
    is given) and, asymmetric, zero points, or a code book (sorted, distinct) where asked: the op's inputs
    ``B, scales, zero_points, code_book``."""
    k_blocks = -(-K // block_size)
    b = rng.integers(0, 256, (N, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.005, 0.05, N * k_blocks).astype(np.float32)
    if scale_block is not None:
        groups = -(-N // scale_block) * k_blocks
        scales = EightBitScales(rng.integers(0, 256, N * k_blocks, dtype=np.uint8),
                                rng.uniform(2e-5, 2e-4, groups).astype(np.float32),
                                rng.integers(0, 16, groups, dtype=np.uint8), scale_block)
    zero_points = None if symmetric or code_book else rng.integers(0, 256, N * -(-k_blocks * bits // 8),
                                                                    dtype=np.uint8)
    book = np.sort(rng.choice(np.arange(-127, 128), CODE_BOOK_SIZE, replace=False)).astype(np.int8)
    return b, scales, zero_points, book if code_book else None
