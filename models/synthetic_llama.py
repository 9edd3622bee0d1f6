"""A LLaMA-shaped decoder of about 1.03B parameters with random weights: 4.1 GB of fp32 external data.

It exists so that models past protobuf's 2 GB limit, and compiles that must stream their weights, are
exercised for real (issue: compile every INT4 recipe within 8 GB). TinyLlama-1.1B's shape, with the embedding
tied to the head as SmolLM2's is. Every tensor is made from a seed derived from its name when the model is
written, so building it holds one tensor at a time and gives the same bytes on every machine.
"""
from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir

from qcompile.models.registry import ModelEntry
from qcompile.models.smollm2 import LlamaConfig, build_graph

CONFIG = LlamaConfig(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, eps=1e-5,
                     rope_theta=10000.0, context=2048)


def _shape(cfg: LlamaConfig, name: str) -> tuple[int, ...]:
    """The Hugging Face shape of parameter ``name`` ([out, in] for linear layers)."""
    kv = cfg.kv_heads * cfg.head_dim
    shapes = {"q_proj": (cfg.hidden, cfg.hidden), "k_proj": (kv, cfg.hidden), "v_proj": (kv, cfg.hidden),
              "o_proj": (cfg.hidden, cfg.hidden), "gate_proj": (cfg.intermediate, cfg.hidden),
              "up_proj": (cfg.intermediate, cfg.hidden), "down_proj": (cfg.hidden, cfg.intermediate),
              "embed_tokens": (cfg.vocab, cfg.hidden)}
    module = name.split(".")[-2]
    return shapes.get(module, (cfg.hidden,))  # the rest are RMSNorm weights


def _random_parameter(name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if len(shape) == 1:  # RMSNorm gains near 1
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return 0.02 * rng.standard_normal(shape, dtype=np.float32)


def random_weights(cfg: LlamaConfig):
    def load(name: str) -> ir.LazyTensor:
        shape = _shape(cfg, name)
        return ir.LazyTensor(lambda: ir.tensor(_random_parameter(name, shape)), ir.DataType.FLOAT, ir.Shape(shape))

    return load


def build() -> ir.Model:
    return build_graph(CONFIG, random_weights(CONFIG), name="synthetic-llama-1b")


ENTRY = ModelEntry(
    name="llama-1b",
    summary="synthetic LLaMA decoder, TinyLlama-1.1B's shape with a tied head (22 layers, hidden 2048, GQA 32/4), "
            "random weights, 1.03B parameters, 4.1 GB of external data",
    build=build,
    tags=("synthetic", "llm", "large"),
)
