"""What the deployment CPU can run correctly (KERNELS.md, MODELS.md).

On x86 without VNNI, ONNX Runtime's u8 x s8 integer kernels (VPMADDUBSW) multiply u8 activations by
s8 weights and add each pair of neighbouring products along the reduction axis K, (2i, 2i+1), in
16 bits with saturation: 255 * 127 * 2 overflows, so full-range INT8 weights give wrong results.
With VNNI the products are added in 32 bits and nothing saturates.

Weights that are exact everywhere, from fastest and most precise to the alternatives:

* `any` (default): 8-bit INT8 weights in which every same-signed neighbour pair along K sums to at
  most 128 in magnitude (255 * 128 = 32640 fits in 16 bits). Each output channel gets a step just
  coarse enough that no pair of its real values exceeds that (0.35 bit lost on average on
  MobileNetV2 and MiniLM, where 7-bit weights lose a whole bit); a pair that rounding still pushes
  over is moved to the nearest admissible one. The fast u8 x s8 kernels then run exactly on every
  x86 CPU.
* `u8u8`: the plain 8-bit grid stored as UINT8 around 128, which sends ONNX Runtime to its slower
  u8 x u8 kernels.
* `7bit`: |q| <= 63 everywhere.

Measured (tests/qcompile/test_targets.py checks it against ONNX Runtime): the pairs run along K in
a MatMul's weight (K, N), and along (kh, kw, C) in a Conv's weight (O, C, kh, kw) since its kernels
work channels-last. Depthwise convolutions (one input and one output channel per group) run in a
kernel that widens to 32 bits before adding, so they keep the full grid.

The compiler cannot know the user's CPU, so the default is what is right on every CPU; the report
says which choice was made.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile.errors import UsageError

# The largest |q0 + q1| of a same-signed weight pair whose products with u8 activations fit in int16.
PAIR_LIMIT = 128


@dataclass(frozen=True)
class CpuProfile:
    choice: str
    weight_dtype: str  # "int8" or "uint8"
    weight_qmax: int
    pair_limit: int | None  # see `limit_pairs`; None: no limit
    reason: str

    def weight_constraint(self, op_type: str, weight_shape: tuple[int, ...], group: int = 1,
                          trans_b: bool = False) -> PairSumLimit | None:
        """The pair limit on the weight of an op that runs on these integer kernels, where they add pairs."""
        axes = reduction_axes(op_type, weight_shape, group, trans_b)
        return None if self.pair_limit is None or axes is None else PairSumLimit(self.pair_limit, axes)


@dataclass(frozen=True)
class PairSumLimit:
    """Weights whose same-signed neighbour pairs along ``axes`` add up to at most ``limit`` levels (a
    `LevelConstraint` of `qcompile.decisions`)."""

    limit: int
    axes: tuple[int, ...]

    def min_step(self, weight: np.ndarray, axis: int | None) -> np.ndarray:
        """A step coarse enough that no pair of real values exceeds the limit."""
        return _reduce_to(pair_sums(weight, self.axes), axis, self.axes, weight.ndim) / self.limit

    def apply(self, q: np.ndarray, real: np.ndarray) -> np.ndarray:
        return limit_pairs(q, real, self.axes, self.limit)


def has_vnni(cpuinfo: str | None = None) -> bool:
    """True if this x86 CPU has AVX-512 VNNI or AVX-VNNI; True on non-x86 CPUs (no such saturation)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_profile(choice: str) -> CpuProfile:
    if choice == "native":
        choice = "vnni" if has_vnni() else "avx2"
        detected = f" (detected on this machine: {choice})"
    else:
        detected = ""
    if choice == "vnni":
        return CpuProfile("vnni", "int8", 127, None, "INT8 weights, u8 x s8 kernels: exact with VNNI, wrong on "
                          "AVX2-only x86" + detected)
    if choice in ("any", "avx2"):
        return CpuProfile(choice, "int8", 127, PAIR_LIMIT, "8-bit INT8 weights with neighbouring pairs along K "
                          f"limited to {PAIR_LIMIT}: u8 x s8 kernels, exact on every x86 CPU" + detected)
    if choice == "u8u8":
        return CpuProfile(choice, "uint8", 127, None, "8-bit weights stored as UINT8 around 128: u8 x u8 kernels "
                          "(slower), exact on every x86 CPU")
    if choice == "7bit":
        return CpuProfile(choice, "int8", 63, None, "7-bit INT8 weights: u8 x s8 kernels exact on every x86 CPU")
    raise UsageError(f"option cpu: expected any, vnni, avx2, u8u8, 7bit or native, got {choice!r}")


def reduction_axes(op_type: str, weight_shape: tuple[int, ...], group: int = 1, trans_b: bool = False
                   ) -> tuple[int, ...] | None:
    """The axes of a weight in the order ONNX Runtime's integer kernels walk their reduction K
    (innermost last); None where no pairs are added in 16 bits (depthwise Conv) or for other ops."""
    rank = len(weight_shape)
    if op_type in ("Conv", "QLinearConv", "ConvInteger"):
        if group > 1 and group == weight_shape[0] and weight_shape[1] == 1:
            return None
        return (*range(2, rank), 1)
    if op_type in ("Gemm", "QGemm"):
        return (1,) if trans_b else (0,)
    if op_type in ("MatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        return (rank - 2,) if rank >= 2 else None
    return None


def _pairs(q: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """``q`` as (rows, pairs, 2): every other axis first, then ``axes`` flattened in order (padded to even)."""
    order = (*[a for a in range(q.ndim) if a not in axes], *axes)
    moved = q.transpose(order)
    k = int(np.prod([q.shape[a] for a in axes]))
    flat = moved.reshape(-1, k)
    if k % 2:
        flat = np.pad(flat, ((0, 0), (0, 1)))
    return flat.reshape(flat.shape[0], -1, 2), order


def pair_sums(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The largest magnitude a neighbour pair of ``w`` along ``axes`` adds up to with non-negative
    activations (|w0 + w1| if they have the same sign, else the larger |w|), for each index of the other
    axes (in their order)."""
    pairs, order = _pairs(np.asarray(w, np.float64), axes)
    same = np.sign(pairs[..., 0]) == np.sign(pairs[..., 1])
    worst = np.where(same, np.abs(pairs.sum(-1)), np.abs(pairs).max(-1)).max(-1, initial=0.0)
    return worst.reshape([w.shape[a] for a in order[: w.ndim - len(axes)]])


def worst_pair_sum(q: np.ndarray, axes: tuple[int, ...]) -> int:
    """The largest of `pair_sums` of integer weights ``q``."""
    return int(pair_sums(q, axes).max(initial=0))


def limit_pairs(q: np.ndarray, real: np.ndarray, axes: tuple[int, ...], limit: int) -> np.ndarray:
    """``q`` (rounded ``real``, both float arrays on the integer grid, zero point 0) with every same-signed
    neighbour pair along ``axes`` whose magnitudes add up to more than ``limit`` moved to the admissible
    pair nearest to ``real``: both magnitudes lowered by half the excess, then rounded to sum to ``limit``.

    With a scale chosen so that ``real``'s pairs stay within ``limit`` (`symmetric_weight_spec`), only
    rounding can push a pair over, by one level."""
    pairs, order = _pairs(q.copy(), axes)
    reals, _ = _pairs(real, axes)
    sign = np.sign(pairs[..., 0])
    over = (sign == np.sign(pairs[..., 1])) & (np.abs(pairs).sum(-1) > limit)
    if not over.any():
        return q
    magnitude = np.abs(reals[over])
    first = np.clip(np.rint(magnitude[:, 0] - (magnitude.sum(-1) - limit) / 2), 0, limit)
    pairs[over] = sign[over][:, None] * np.stack([first, limit - first], axis=-1)
    k = int(np.prod([q.shape[a] for a in axes]))
    moved_shape = [q.shape[a] for a in order]
    flat = pairs.reshape(pairs.shape[0], -1)[:, :k]
    return flat.reshape(moved_shape).transpose(np.argsort(order))


def _reduce_to(per_row: np.ndarray, axis: int | None, reduction_axes: tuple[int, ...], rank: int) -> np.ndarray:
    """Max of ``per_row`` (indexed by the axes not in ``reduction_axes``, in order) down to ``axis`` (or a scalar)."""
    others = [a for a in range(rank) if a not in reduction_axes]
    if axis is None:
        return per_row.max(initial=0.0)
    keep = others.index(axis)
    return per_row.max(axis=tuple(i for i in range(per_row.ndim) if i != keep), initial=0.0)
