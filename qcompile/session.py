"""ONNX Runtime sessions for qcompile's output models."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from qcompile import kernels
from qcompile.errors import UsageError
from qcompile.runtime import onnxruntime, runtime_version


# For sessions timed against each other, runs interleaved: a session's idle threads spin for a while after
# each run, on the cores the next session then runs on. On 2 cores, five sessions of PP-OCRv2's recognizer
# so (batch 8) measured a float copy at 1.20x the fp32 model it computes exactly as, and the integer one at
# 0.39x; without spinning, 1.00x and 0.78x.
TIMING = {"session.intra_op.allow_spinning": "0"}

# ONNX Runtime before 1.32 (1.20.1 and 1.28 seen) fuses DequantizeLinear -> MatMul into MatMulIntegerToFloat
# for FP8 inputs too, and then refuses the graph at its default optimization level; basic optimizations leave
# the Q/DQ as they are.
FP8_FUSION_FIXED = (1, 32)
_FLOAT8_TYPES = (17, 18, 19, 20)  # TensorProto FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ


def misfuses_float8(model) -> bool:
    """Whether this ONNX Runtime would refuse ``model`` (a ModelProto) at its default optimization level: it
    stores FP8 tensors and the runtime is older than `FP8_FUSION_FIXED`."""
    return (runtime_version(onnxruntime()) < FP8_FUSION_FIXED
            and any(t.data_type in _FLOAT8_TYPES for t in model.graph.initializer))


def _misfuses_float8_file(path: str | os.PathLike) -> bool:
    if runtime_version(onnxruntime()) >= FP8_FUSION_FIXED:
        return False  # the file need not be read
    import onnx

    try:
        return misfuses_float8(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - ONNX Runtime reports an unreadable file itself
        return False


def session(path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None,
            integer_kernels: bool = True, libraries: Sequence[str | os.PathLike] = (),
            config: Mapping[str, str] | None = None):
    """An `onnxruntime.InferenceSession` for ``path`` (external data is read from beside it).

    ``integer_kernels=False`` keeps ONNX Runtime from fusing Q/DQ groups into its integer ops, so
    the model computes Q/DQ as ONNX defines them (see `qcompile.targets.Target.qdq_semantics`).
    ``libraries``: custom-op libraries to register besides qcompile's own (`qcompile.kernels`), which is
    registered whenever it is built.
    ``config``: session configuration entries (`SessionOptions.add_session_config_entry`).
    """
    if isinstance(providers, str):
        providers = [providers]
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach the user as exceptions, not as ORT's log lines
    if not integer_kernels or _misfuses_float8_file(path):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    own = kernels.built_library()
    for library in [*libraries, *([own] if own else [])]:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as exc:
            raise UsageError(f"{library}: ONNX Runtime cannot load this custom-op library: {_first_line(exc)}") from None
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for files it cannot load
        if own is None and kernels.DOMAIN in str(exc):
            kernels.require_library()  # says how to build it
        raise UsageError(f"{path}: ONNX Runtime cannot load it: {_first_line(exc)}") from None


def run(sess, names: list[str] | None, feed: dict, what: str) -> list:
    """``sess.run``, with ORT's failures (bad data, a kernel that refuses) as one-line usage errors."""
    try:
        return sess.run(names, feed)
    except Exception as exc:
        raise UsageError(f"running {what} failed: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
