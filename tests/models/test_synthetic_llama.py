"""The 1B-parameter synthetic LLaMA: built tensor by tensor, and compiled within 8 GB (slow)."""
from dataclasses import replace

import numpy as np
import pytest

import qcompile
from qcompile.io import load_model, save_model
from qcompile.models import synthetic_llama
from qcompile.models.registry import build_cached
from qcompile.models.smollm2 import build_graph
from qcompile.session import session

TINY = replace(synthetic_llama.CONFIG, vocab=96, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2,
               context=32)


def test_weights_are_made_from_their_names_when_written_and_the_model_runs(tmp_path):
    path = save_model(build_graph(TINY, synthetic_llama.random_weights(TINY)), tmp_path / "tiny.onnx",
                      external_data=True)
    weights = load_model(path).graph.initializers
    np.testing.assert_array_equal(weights["layers.1.mlp.down_proj.weight.T"].const_value.numpy(),
                                  synthetic_llama._random_parameter("layers.1.mlp.down_proj.weight", (64, 96)).T)
    assert weights["layers.0.self_attn.k_proj.weight.T"].const_value.shape == (64, 32)  # GQA: 2 of 4 heads
    logits = session(path).run(None, {"input_ids": np.array([[1, 2, 3, 95]], np.int64)})[0]
    assert logits.shape == (1, 4, 96) and np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.slow
def test_the_1b_model_compiles_to_int4_within_8_gb(tmp_path):
    """4.1 GB of fp32 weights: the compile reads them one at a time (`ReadOnDemandTensor`)."""
    path = build_cached(synthetic_llama.ENTRY)
    result = qcompile.compile(path, recipe="w4a16-rtn")
    assert result.report["peak_memory_bytes"] < 8e9
    out = result.save(tmp_path / "llama-int4.onnx")
    assert result.report["size_bytes"]["after"] < 0.2 * result.report["size_bytes"]["before"]
    ids = np.array([[1, 200, 3000, 31999]], np.int64)
    compiled = session(out).run(None, {"input_ids": ids})[0]
    assert compiled.shape == (1, 4, 32000) and np.isfinite(compiled).all()
