"""all-MiniLM-L6-v2 built without torch: graph interface, sensible embeddings, masking, and an
independent numpy forward pass from the same safetensors."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import onnx
import pytest

from qcompile.errors import UsageError
from qcompile.io import load_model
from qcompile.models.minilm import ENTRY, PACKAGE, sentence_data, tokenize
from qcompile.models.registry import build_cached
from qcompile.runtime import onnxruntime

GUITAR = "A man is playing a guitar."
INSTRUMENT = "Someone plays an instrument."
STOCKS = "The stock market fell sharply today."


@pytest.fixture(scope="module")
def model_path():
    return build_cached(ENTRY)


@pytest.fixture(scope="module")
def session(model_path):
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def run(session, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    hidden, embedding = session.run(["last_hidden_state", "sentence_embedding"], inputs)
    return hidden, embedding


def test_graph_looks_like_a_torch_bert_export(model_path):
    onnx.checker.check_model(str(model_path), full_check=True)
    model = load_model(model_path)
    graph = model.graph
    assert [(v.name, v.dtype, str(v.shape)) for v in graph.inputs] == [
        (name, onnx.TensorProto.INT64, "[batch,seq]") for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert [(v.name, str(v.shape)) for v in graph.outputs] == [
        ("last_hidden_state", "[batch,seq,384]"), ("sentence_embedding", "[batch,384]")]
    ops = Counter(node.op_type for node in graph)
    assert (ops["LayerNormalization"], ops["Softmax"], ops["Erf"]) == (13, 6, 6)
    # 6 linears per layer with a constant [in, out] weight, plus q@k^T and probs@v per layer.
    const_matmuls = [n for n in graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert (len(const_matmuls), ops["MatMul"]) == (36, 48)
    assert sorted(n.inputs[1].shape[0] for n in const_matmuls) == [384] * 30 + [1536] * 6
    # The additive attention mask uses the float32 minimum, as HF does.
    assert any(v.const_value is not None and v.const_value.numpy().size == 1
               and v.const_value.numpy() == np.finfo(np.float32).min for v in graph.initializers.values())


def test_similar_sentences_are_closer(session):
    _, e = run(session, tokenize([GUITAR, INSTRUMENT, STOCKS]))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert related == pytest.approx(0.667, abs=0.01)
    assert unrelated == pytest.approx(-0.054, abs=0.01)
    assert float(e[1] @ e[2]) < 0.1


def test_padding_is_masked_out(session):
    texts = [GUITAR, "A much longer sentence that takes up quite a few more tokens than the first one."]
    long_hidden, long_emb = run(session, tokenize(texts, seq=128))
    short = tokenize(texts, seq=32)
    short_hidden, short_emb = run(session, short)
    np.testing.assert_allclose(short_emb, long_emb, atol=1e-5)
    real = short["attention_mask"].astype(bool)
    np.testing.assert_allclose(short_hidden[real], long_hidden[:, :32][real], atol=1e-4)
    # Whatever sits under a zero mask is ignored, not just the pad token.
    garbage = {k: v.copy() for k, v in short.items()}
    garbage["input_ids"][~real] = np.random.default_rng(0).integers(1000, 30000, size=int((~real).sum()))
    np.testing.assert_allclose(run(session, garbage)[1], short_emb, atol=1e-5)


def _reference_forward(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """BERT + mean pooling + L2 normalization in float64 numpy, straight from the safetensors."""
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(PACKAGE.path())).items()}
    cfg = json.loads((PACKAGE.path().parent / "config.json").read_text())
    heads, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    erf = np.vectorize(math.erf)

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

    ids, mask, types = inputs["input_ids"], inputs["attention_mask"].astype(bool), inputs["token_type_ids"]
    batch, seq = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][types]
         + w["embeddings.position_embeddings.weight"][np.arange(seq)])
    x = norm(x, "embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(x, f"{p}.attention.self.{n}").reshape(batch, seq, heads, -1).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        scores = np.where(mask[:, None, None, :], scores, -np.inf)  # masked keys get no weight at all
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = norm(x + linear(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        f = linear(x, f"{p}.intermediate.dense")
        f = 0.5 * f * (1 + erf(f / math.sqrt(2)))
        x = norm(x + linear(f, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return x, pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_matches_independent_numpy_forward(session):
    inputs = tokenize([GUITAR, STOCKS + " " + INSTRUMENT], seq=24)
    assert not inputs["attention_mask"].all()  # padding is part of what is checked
    hidden, embedding = run(session, inputs)
    ref_hidden, ref_embedding = _reference_forward(inputs)
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], ref_hidden[real], atol=1e-4)
    np.testing.assert_allclose(embedding, ref_embedding, atol=1e-4)


def test_tokenize_pads_and_truncates():
    short, long = "Hello world.", " ".join(["word"] * 100)
    inputs = tokenize([short, long], seq=16)
    assert {k: (v.dtype, v.shape) for k, v in inputs.items()} == {
        k: (np.dtype(np.int64), (2, 16)) for k in ("input_ids", "attention_mask", "token_type_ids")}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert mask[0].tolist() == [1] * 5 + [0] * 11  # [CLS] hello world . [SEP]
    assert ids[0, 0] == 101 and ids[0, 4] == 102 and not ids[0, 5:].any()
    assert mask[1].all() and ids[1, -1] == 102  # truncated, still closed by [SEP]
    assert not inputs["token_type_ids"].any()
    with pytest.raises(UsageError):
        tokenize([short], seq=1000)


def test_sentence_data_splits():
    calibration = sentence_data("calibration", 8, seq=32)
    evaluation = sentence_data("evaluation", 8, seq=32)
    assert calibration["input_ids"].shape == evaluation["input_ids"].shape == (8, 32)
    assert (calibration["input_ids"][:, 0] == 101).all()
    assert not np.array_equal(calibration["input_ids"], evaluation["input_ids"])
    with pytest.raises(UsageError):
        sentence_data("evaluation", 100_000)
