"""Targets as objects: what each deployment runtime accepts, and how to run a model as it would.

A recipe asks its `Target` what to emit (activation grid, integer biases, contrib ops, Q/DQ layout);
verification opens sessions through it. Adding a target is one more `Target` in `TARGETS`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

from qcompile.errors import UsageError

STANDARD_DOMAINS = ("", "ai.onnx")
CONTRIB_DOMAIN = "com.microsoft"
CUSTOM_DOMAIN = "ai.qcompile"  # qcompile's own library (`qcompile.kernels`): CPU kernels only so far


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    # The type of 8-bit activations: UINT8 for ONNX Runtime, symmetric INT8 for TensorRT.
    activation_dtype: ir.DataType
    # Integer types its Q/DQ may carry (16-bit below opset 21 only where contrib ops are allowed).
    grids: tuple[ir.DataType, ...]
    # Op domains a model for it may use.
    domains: tuple[str, ...] = STANDARD_DOMAINS
    # Its runtime computes Q/DQ as ONNX defines them (INT8 products summed in 32 bits) with full-range
    # INT8 weights; checked on ONNX Runtime's CPU, such models run without its integer fusions, which
    # on x86 without VNNI would saturate where the target never does.
    qdq_semantics: bool = False
    # ONNX Runtime's CPU integer kernels may run its models: weights follow the `cpu` option.
    cpu_kernels: bool = False
    # The Q/DQ layout ONNX Runtime's fusions expect: INT32 biases, one Q/DQ per tensor shared by its
    # readers, a Conv's output on its Relu/Clip's grid. TensorRT wants float biases and one Q/DQ per
    # reader, and fuses Conv + Relu itself.
    ort_qdq_layout: bool = True
    # `format=qoperator` (ONNX Runtime's QLinear* ops) may be written for it.
    qoperator: bool = False
    # It takes quantization as symmetric INT8 Q/DQ only (zero point 0, no integer ops), weight scales
    # along the output channels.
    symmetric_int8_only: bool = False
    # Activations quantized at run time (w8a8-dynamic).
    dynamic_activations: bool = True
    # Its runtime folds `Cast(int8) -> Mul(scale)` of initializers when it loads a model, so the weights of
    # float layers may be stored as INT8 (`store-int8-weights`). Not relied on for TensorRT.
    folds_int8_weights: bool = True
    # Custom-op domains whose library (`qcompile.kernels`) has kernels for its runtime.
    custom_op_domains: tuple[str, ...] = ()

    @property
    def contrib_ops(self) -> bool:
        return CONTRIB_DOMAIN in self.domains

    def allows(self, dtype: ir.DataType) -> bool:
        return dtype in self.grids

    def session(self, path: str | os.PathLike, threads: int | None = None, config: Mapping[str, str] | None = None):
        """An ONNX Runtime session (on this machine's CPU) that computes ``path`` as this target would
        (``config``: session configuration entries)."""
        from qcompile.session import session

        return session(path, threads=threads, integer_kernels=not self.qdq_semantics, config=config)

    @property
    def checked_on(self) -> str:
        """How a model compiled for this target is run when it is checked on this machine."""
        if self.qdq_semantics:
            return (f"ONNX Runtime CPU with Q/DQ computed as ONNX defines them, as {self.name} does "
                    f"(no latency: not {self.name}'s)")
        return "ONNX Runtime CPU"


_INTEGERS = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.INT32)
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ort-cpu", "ONNX Runtime CPU", ir.DataType.UINT8, _INTEGERS,
           domains=(*STANDARD_DOMAINS, CONTRIB_DOMAIN), cpu_kernels=True, qoperator=True,
           custom_op_domains=(CUSTOM_DOMAIN,)),
    Target("ort-cuda", "ONNX Runtime CUDA", ir.DataType.UINT8, _INTEGERS,
           domains=(*STANDARD_DOMAINS, CONTRIB_DOMAIN), qdq_semantics=True),
    Target("tensorrt", "TensorRT", ir.DataType.INT8, (ir.DataType.INT8,), qdq_semantics=True,
           ort_qdq_layout=False, symmetric_int8_only=True, dynamic_activations=False, folds_int8_weights=False),
    Target("portable", "standard ONNX ops only (any runtime)", ir.DataType.UINT8, _INTEGERS, cpu_kernels=True),
)}
DEFAULT_TARGET = "ort-cpu"


def get_target(name: str) -> Target:
    target = TARGETS.get(name)
    if target is None:
        raise UsageError(f"unknown target {name!r} (one of {', '.join(TARGETS)})")
    return target
