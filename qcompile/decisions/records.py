"""Decisions of the analyses that rescale or correct the float model (SmoothQuant, equalization, bias
correction): recorded so that the pass that applies them, the report and `qcompile eval` can read them."""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True, eq=False)
class Smoothing:
    """SmoothQuant for one MatMul input: divide its channels by ``scale`` and multiply the rows of the
    weights of ``layers`` by it. ``alpha`` is the migration strength chosen."""

    alpha: float
    scale: np.ndarray = field(repr=False)
    layers: tuple[ir.Node, ...] = field(repr=False)


@dataclass(frozen=True, eq=False)
class Equalization:
    """Scale output channel c of the Conv by ``scale[c]`` and depthwise kernel c of ``depthwise`` by 1 / ``scale[c]``."""

    scale: np.ndarray = field(repr=False)
    activation: ir.Node = field(repr=False)
    depthwise: tuple[ir.Node, ...] = field(repr=False)


@dataclass(frozen=True)
class BiasCorrection:
    """The mean output shift of the layer's weight rounding, per output channel, to take off its bias."""

    shift: np.ndarray = field(repr=False)


def take_decisions(holders: Iterable[ir.Node | ir.Value], key: str) -> list[tuple[ir.Node | ir.Value, object]]:
    """(holder, decision) for each node or value that carries one under ``key``, taken off it: the pass
    that applies a decision consumes it, so a second run finds nothing to do."""
    return [(holder, holder.meta.pop(key)) for holder in list(holders) if key in holder.meta]


def channel_scale_json(factors: np.ndarray) -> str:
    """`CHANNEL_SCALE_KEY` metadata for a tensor multiplied by ``factors`` (broadcast as numpy does)."""
    return json.dumps({"shape": list(factors.shape), "factors": [float(f"{f:.7g}") for f in factors.reshape(-1)]})


def read_channel_scale(text: str) -> np.ndarray:
    """The factors of `channel_scale_json`, shaped to broadcast against the tensor."""
    recorded = json.loads(text)
    return np.array(recorded["factors"], np.float64).reshape(recorded["shape"])
