"""Small synthetic graphs with random weights, for fast tests of every pass.

Each builder is deterministic (fixed seed) and exercises one structure real models have:
an MLP (MatMul + Add), a CNN (Conv + BatchNormalization + ReLU6 + residual Add + Gemm), a transformer
block (LayerNorm, attention with an additive mask, Erf-GELU) and a graph with an If.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.models.graph_builder import GraphBuilder
from qcompile.models.registry import ModelEntry

FLOAT = ir.DataType.FLOAT


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _weight(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def mlp(hidden: int = 32, layers: int = 3) -> ir.Model:
    """x[batch, 16] -> (MatMul + Add + Relu) x layers -> MatMul -> y[batch, 10]."""
    rng, b = _rng(), GraphBuilder("mlp")
    h = b.input("x", FLOAT, ["batch", 16])
    width = 16
    for i in range(layers):
        h = b.op("MatMul", h, b.const(f"fc{i}.weight", _weight(rng, width, hidden)), name=f"fc{i}")
        h = b.op("Add", h, b.const(f"fc{i}.bias", rng.standard_normal(hidden).astype(np.float32) * 0.1),
                 name=f"fc{i}.bias_add")
        h = b.op("Relu", h, name=f"relu{i}")
        width = hidden
    y = b.op("MatMul", h, b.const("head.weight", _weight(rng, width, 10)), name="head")
    return b.model({"y": y})


def _conv_bn(b: GraphBuilder, rng, x: ir.Value, name: str, cin: int, cout: int, kernel: int = 3,
             stride: int = 1, group: int = 1, relu6: bool = True) -> ir.Value:
    pad = kernel // 2
    w = b.const(f"{name}.weight", _weight(rng, cout, cin // group, kernel, kernel))
    h = b.op("Conv", x, w, name=name, pads=[pad] * 4, strides=[stride, stride], group=group)
    stats = [
        rng.uniform(0.5, 1.5, cout), rng.standard_normal(cout) * 0.1,
        rng.standard_normal(cout) * 0.1, rng.uniform(0.5, 2.0, cout),
    ]
    h = b.op("BatchNormalization", h, *(b.const(f"{name}.bn.{k}", s.astype(np.float32))
                                        for k, s in zip(("scale", "bias", "mean", "var"), stats)),
             name=f"{name}.bn", epsilon=1e-5)
    if relu6:
        h = b.op("Clip", h, b.const(f"{name}.min", 0.0), b.const(f"{name}.max", 6.0), name=f"{name}.relu6")
    return h


def cnn() -> ir.Model:
    """pixel_values[batch, 3, 32, 32]: Conv+BN+ReLU6 stem, a depthwise/pointwise residual block, Gemm head."""
    rng, b = _rng(), GraphBuilder("cnn")
    x = b.input("pixel_values", FLOAT, ["batch", 3, 32, 32])
    stem = _conv_bn(b, rng, x, "stem", 3, 16, stride=2)
    h = _conv_bn(b, rng, stem, "block.depthwise", 16, 16, group=16)
    h = _conv_bn(b, rng, h, "block.pointwise", 16, 16, kernel=1, relu6=False)
    h = b.op("Add", stem, h, name="block.residual")
    h = b.op("GlobalAveragePool", h, name="pool")
    h = b.op("Flatten", h, name="flatten", axis=1)
    logits = b.op("Gemm", h, b.const("classifier.weight", _weight(rng, 10, 16)),
                  b.const("classifier.bias", np.zeros(10, np.float32)), name="classifier", transB=1)
    return b.model({"logits": logits})


def transformer_block(hidden: int = 32, heads: int = 4, seq: str = "seq") -> ir.Model:
    """One pre-LN encoder block on x[batch, seq, hidden] with an additive float-min attention mask."""
    rng, b = _rng(), GraphBuilder("transformer_block")
    x = b.input("x", FLOAT, ["batch", seq, hidden])
    mask = b.input("attention_mask", ir.DataType.INT64, ["batch", seq])
    head_dim = hidden // heads

    def linear(h, name, cin, cout):
        h = b.op("MatMul", h, b.const(f"{name}.weight", _weight(rng, cin, cout)), name=name)
        return b.op("Add", h, b.const(f"{name}.bias", np.zeros(cout, np.float32)), name=f"{name}.bias_add")

    def layer_norm(h, name):
        return b.op("LayerNormalization", h, b.const(f"{name}.weight", np.ones(hidden, np.float32)),
                    b.const(f"{name}.bias", np.zeros(hidden, np.float32)), name=name, axis=-1, epsilon=1e-5)

    def split_heads(h, name):
        h = b.op("Reshape", h, b.const(f"{name}.shape", np.array([0, 0, heads, head_dim])), name=f"{name}.reshape")
        return b.op("Transpose", h, name=f"{name}.transpose", perm=[0, 2, 1, 3])

    h = layer_norm(x, "ln1")
    q = split_heads(linear(h, "q_proj", hidden, hidden), "q")
    k = split_heads(linear(h, "k_proj", hidden, hidden), "k")
    v = split_heads(linear(h, "v_proj", hidden, hidden), "v")
    scores = b.op("MatMul", q, b.op("Transpose", k, name="k.t", perm=[0, 1, 3, 2]), name="scores")
    scores = b.op("Div", scores, b.const("scale", np.float32(np.sqrt(head_dim))), name="scores.scale")
    float_mask = b.op("Cast", b.op("Unsqueeze", mask, b.const("mask.axes", np.array([1, 2])), name="mask.unsqueeze"),
                      name="mask.cast", to=FLOAT)
    additive = b.op("Mul", b.op("Sub", b.const("one", 1.0), float_mask, name="mask.invert"),
                    b.const("float_min", np.float32(np.finfo(np.float32).min)), name="mask.additive")
    probs = b.op("Softmax", b.op("Add", scores, additive, name="scores.mask"), name="softmax", axis=-1)
    context = b.op("Transpose", b.op("MatMul", probs, v, name="context"), name="context.t", perm=[0, 2, 1, 3])
    context = b.op("Reshape", context, b.const("context.shape", np.array([0, 0, hidden])), name="context.reshape")
    h = b.op("Add", x, linear(context, "o_proj", hidden, hidden), name="residual1")
    up = linear(layer_norm(h, "ln2"), "fc1", hidden, 4 * hidden)
    gelu = b.op("Mul", b.op("Mul", up, b.const("half", 0.5), name="gelu.half"),
                b.op("Add", b.const("gelu.one", 1.0),
                     b.op("Erf", b.op("Div", up, b.const("sqrt2", float(np.sqrt(2))), name="gelu.div"), name="gelu.erf"),
                     name="gelu.add"), name="gelu")
    y = b.op("Add", h, linear(gelu, "fc2", 4 * hidden, hidden), name="residual2")
    return b.model({"y": y})


def with_if() -> ir.Model:
    """y = If(sum(x) > 0, then: MatMul(x, W1), else: MatMul(x, W2)) followed by a top-level MatMul."""
    rng, b = _rng(), GraphBuilder("with_if")
    x = b.input("x", FLOAT, ["batch", 8])

    def branch(name: str) -> ir.Graph:
        weight = ir.Value(name=f"{name}.weight", const_value=ir.tensor(_weight(rng, 8, 8)))
        weight.type, weight.shape = ir.TensorType(FLOAT), ir.Shape([8, 8])
        out = ir.Value(name=f"{name}.out", type=ir.TensorType(FLOAT), shape=ir.Shape(["batch", 8]))
        node = ir.node("MatMul", [x, weight], name=f"{name}.matmul", outputs=[out])
        return ir.Graph([], [out], nodes=[node], initializers=[weight], name=name)

    positive = b.op("Greater", b.op("ReduceSum", x, name="sum", keepdims=0), b.const("zero", 0.0), name="positive")
    chosen = b.op("If", positive, name="branch", then_branch=branch("then"), else_branch=branch("else"))
    y = b.op("MatMul", chosen, b.const("head.weight", _weight(rng, 8, 4)), name="head")
    return b.model({"y": y})


ENTRIES = (
    ModelEntry("mlp", "synthetic 3-layer MLP (MatMul + Add + Relu)", mlp, tags=("synthetic",)),
    ModelEntry("cnn", "synthetic CNN: Conv + BatchNorm + ReLU6, depthwise residual block, Gemm", cnn,
               tags=("synthetic",)),
    ModelEntry("transformer-block", "synthetic pre-LN encoder block with a float-min attention mask",
               transformer_block, tags=("synthetic",)),
    ModelEntry("if-graph", "synthetic graph with an If whose branches hold MatMul weights", with_if,
               tags=("synthetic",)),
)
