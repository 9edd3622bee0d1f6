"""How a weight left float is stored, if not as float32: INT8 with one scale per channel, or float16.

Shared by the pass that chooses (`choose-int8-storage`) and those that rewrite (`store-int8-weights`,
`store-float16-weights`).
"""
from __future__ import annotations

import numpy as np

QMAX = 127


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
    """``array`` in float16, unless float16 cannot hold it (beyond 65504, or non-zero values it flushes to zero)."""
    with np.errstate(over="ignore"):
        half = array.astype(np.float16)
    representable = np.isfinite(half) & ((half != 0) | (array == 0))
    return half if representable.all() else None
