"""``ai.qcompile.OutlierSplitMatMul``: LLM.int8() (Dettmers et al. 2022), activations times an INT8 weight with the
activations' outlier columns kept in float.

Inputs: ``A`` (..., K) float32 or float16; ``B`` uint8 (N, K), each output channel's INT8 levels stored + 128
(zero point 128, as MatMulNBits stores 8 bits); ``scales`` float32 (N,): the weight is ``(B - 128) *
scales[:, None]``; ``outlier_columns`` int64 (C,), optional. Attributes ``K``, ``N``, ``threshold`` (float,
default 6.0). Output ``Y`` (..., N), A's type (float16 A is computed as float32, Y rounded to float16 at the end).

The outlier columns are the given ones (fixed, chosen at calibration), or else every input feature k whose
largest |A[.., k]| over the call's rows exceeds ``threshold`` (detected at run time, as bitsandbytes does).
They are multiplied in float32 with their dequantized weight rows. The other columns are quantized per row
(vector-wise): ``sa = max|a| / 127``, ``qa = rint(a * (127 / max|a|))`` in float32, ties to even, and multiplied
as integers, summed in 32 bits:

    Y[m, n] = sa[m] * scales[n] * sum_k qa[m, k] * (B[n, k] - 128)
              + sum_{k outlier} A[m, k] * (B[n, k] - 128) * scales[n]

A row holding NaN or inf outside the outlier columns gives NaN (as a float product would). `reference` is this
in numpy; the C++ kernels compute the integer part exactly and the float parts within float32 rounding.
"""
from __future__ import annotations

import numpy as np

from qcompile.ops import onnx_graphs

DOMAIN = "ai.qcompile"
OP_TYPE = "OutlierSplitMatMul"
DEFAULT_THRESHOLD = 6.0


def outlier_columns(rows: np.ndarray, threshold: float) -> np.ndarray:
    """The input features of ``rows`` (M, K) whose largest magnitude exceeds ``threshold``."""
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(np.abs(rows).max(axis=0, initial=0.0) > threshold)


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (M, K) float32 -> int levels (M, K) and scales (M,) (NaN for a row holding NaN or inf)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        amax = np.abs(rows).max(axis=1, initial=0.0)
        finite = np.isfinite(rows).all(axis=1)
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        levels = np.clip(np.rint(rows * inverse[:, None]), -127, 127)
    levels = np.where(finite[:, None], levels, 0).astype(np.int64)
    return levels, np.where(finite, amax / np.float32(127), np.float32(np.nan)).astype(np.float32)


def reference(a: np.ndarray, b: np.ndarray, scales: np.ndarray, columns: np.ndarray | None = None, *, K: int, N: int,
              threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The operator in numpy (see the module's docstring)."""
    if a.dtype == np.float16:
        return reference(a.astype(np.float32), b, scales, columns, K=K, N=N, threshold=threshold).astype(np.float16)
    rows = a.reshape(-1, K).astype(np.float32)
    outliers = outlier_columns(rows, threshold) if columns is None else np.asarray(columns, np.int64)
    levels = b.reshape(N, K).astype(np.int64) - 128
    rest = rows.copy()
    rest[:, outliers] = 0
    qa, sa = quantize_rows(rest)
    with np.errstate(invalid="ignore"):
        y = (qa @ levels.T).astype(np.float64) * (sa[:, None] * scales[None, :]).astype(np.float64)
        weight = (levels[:, outliers] * scales[:, None]).astype(np.float32)  # (N, C)
        y += rows[:, outliers].astype(np.float64) @ weight.T.astype(np.float64)
    return y.astype(np.float32).reshape(*a.shape[:-1], N)


def decomposed_model(b: np.ndarray, scales: np.ndarray, columns: np.ndarray | None = None, *, K: int, N: int,
                     threshold: float = DEFAULT_THRESHOLD, opset: int = 21):
    """The same computation in standard ONNX ops (`make_model`'s inputs and outputs): the outlier columns found by
    ReduceMax / Greater (or given, as a constant mask), the rest quantized per row by ReduceMax / Round / Clip and
    taken back to float, both times the weight dequantized to float32 at build time. Equal to the operator up to
    float32 rounding (its integer sums are exact; here they are float products)."""
    from onnx import helper

    weight = ((b.reshape(N, K).astype(np.float32) - 128) * scales.reshape(N, 1)).T.copy()
    constants = {"weight": weight, "rows_k": np.array([-1, K], np.int64), "axis0": np.array([0], np.int64),
                 "axis1": np.array([1], np.int64), "n": np.array([N], np.int64),
                 "threshold": np.array(threshold, np.float32), **onnx_graphs.ROUND_TRIP_CONSTANTS}
    nodes = [helper.make_node("Reshape", ["A", "rows_k"], ["rows"])]
    if columns is None:
        nodes += [helper.make_node("Abs", ["rows"], ["magnitudes"]),
                  helper.make_node("ReduceMax", ["magnitudes", "axis0"], ["column_max"], keepdims=1),
                  helper.make_node("Greater", ["column_max", "threshold"], ["outlier"])]
    else:
        mask = np.zeros((1, K), bool)
        mask[0, np.asarray(columns, np.int64)] = True
        constants["outlier"] = mask
    nodes += [
        helper.make_node("Where", ["outlier", "zero", "rows"], ["rest"]),
        helper.make_node("Where", ["outlier", "rows", "zero"], ["outliers"]),
        *onnx_graphs.int8_round_trip("rest", "axis1", "quantized"),
        helper.make_node("MatMul", ["quantized", "weight"], ["y_integer"]),
        helper.make_node("MatMul", ["outliers", "weight"], ["y_outliers"]),
        helper.make_node("Add", ["y_integer", "y_outliers"], ["y_rows"]),
        *onnx_graphs.leading_shape_with("n", "y_rows"),
    ]
    return onnx_graphs.model("outlier_split_matmul_decomposed", nodes, constants, K=K, N=N, opset=opset)


def random_weight(rng: np.random.Generator, *, K: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Random stored levels (full range, never all zero) and scales, as the op takes them."""
    return rng.integers(1, 256, (N, K), dtype=np.uint8), rng.uniform(0.005, 0.05, N).astype(np.float32)


def make_model(b: np.ndarray, scales: np.ndarray, columns: np.ndarray | None = None, *, K: int, N: int,
               threshold: float = DEFAULT_THRESHOLD, opset: int = 21, dtype=np.float32):
    """A one-node model (ModelProto): input ``A`` (batch, rows, K) of ``dtype``, output ``Y``, the weight as
    initializers."""
    weights = {"B": b, "scales": scales,
               **({"outlier_columns": np.asarray(columns, np.int64)} if columns is not None else {})}
    return onnx_graphs.one_node_model(OP_TYPE, DOMAIN, weights, dict(K=K, N=N, threshold=float(threshold)),
                                      K=K, N=N, opset=opset, dtype=dtype)
