"""Shared test helpers: parse models from text, run them in ONNX Runtime, apply passes with verification."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompile import kernels
from qcompile.io import runtime_ir_version
from qcompile.pipeline import Pipeline
from qcompile.session import misfuses_float8

NBITS_8 = pytest.mark.skipif(tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 22),
                             reason="MatMulNBits runs 8 bits from ONNX Runtime 1.22")


def parse(text: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def run(model: ir.Model, feed: dict[str, np.ndarray], config: dict[str, str] | None = None) -> list[np.ndarray]:
    """``model``'s outputs on ``feed`` in ONNX Runtime (CPU), with session ``config`` entries if given."""
    proto = ir.serde.serialize_model(model)
    proto.ir_version = runtime_ir_version(model)  # text models without one get onnx's newest
    options = ort.SessionOptions()
    if misfuses_float8(proto):  # ONNX Runtime before 1.32 refuses FP8 Q/DQ at its default level
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if library := kernels.built_library():  # models with qcompile's custom ops (tests that use them build it)
        options.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def apply(model: ir.Model, *passes: ir.passes.PassBase) -> bool:
    """Run passes through the pipeline (checker + invariants after each); True if any modified the model."""
    return any(r.modified for r in Pipeline(list(passes), verify_each=True).run(model))


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def random_feed(model: ir.Model, batch: int = 2, seq: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.inputs:
        dims = [batch if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) else seq)
                for i, d in enumerate(value.shape)]
        dtype = value.dtype.numpy()
        if np.issubdtype(dtype, np.integer):
            feed[value.name] = np.ones(dims, dtype=dtype)
        else:
            feed[value.name] = rng.standard_normal(dims).astype(dtype)
    return feed
