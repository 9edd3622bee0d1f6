"""How a weight left float is stored, if not as float32: INT8 with one scale per channel, or float16.

Shared by the pass that chooses (`choose-int8-storage`) and those that rewrite (`store-int8-weights`,
`store-float16-weights`).
"""
from __future__ import annotations

import numpy as np

QMAX = 127
# float16 flushes values under 2^-24 to zero: a tensor is stored so where they hold at most this share of
# its energy (60 dB under it). paddle2onnx's weights hold a few values of 1e-14 or float32 denormals beside
# ones of 1e-2: refused for those, 44 of PicoDet's 204 weights stayed float32.
MAX_FLUSHED_ENERGY = 1e-6


def int8_storage(array: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``array`` as INT8 on [-127, 127] and its float32 scales, one per index of ``axes`` (shaped to broadcast)."""
    reduced = tuple(i for i in range(array.ndim) if i not in axes)
    peak = np.max(np.abs(array), axis=reduced, keepdims=True)
    scale = np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)
    return np.clip(np.rint(array / scale), -QMAX, QMAX).astype(np.int8), scale


def int8_decoded(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """What ``array`` becomes once stored as INT8 and decoded."""
    values, scale = int8_storage(array, axes)
    return values * scale


def float16_copy(array: np.ndarray) -> np.ndarray | None:
    """``array`` in float16, unless float16 cannot hold it: beyond 65504, or more than `MAX_FLUSHED_ENERGY` of
    its energy in values it flushes to zero."""
    with np.errstate(over="ignore"):
        half = array.astype(np.float16)
    if not np.isfinite(half).all():
        return None
    flushed = array[(half == 0) & (array != 0)]
    energy = np.sum(np.square(array, dtype=np.float64))
    return half if np.sum(np.square(flushed, dtype=np.float64)) <= MAX_FLUSHED_ENERGY * energy else None
