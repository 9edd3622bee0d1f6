"""MatMul / Gemm whose weight carries a 4- or 8-bit block-wise spec -> ONNX Runtime's ``com.microsoft.MatMulNBits``.

MatMulNBits computes ``A @ dequantized(B)^T`` with B stored per output column n as
``(N, k_blocks, block_size / 2)`` bytes: the 4-bit levels along K, two per byte, the first in the low
nibble; ``scales`` as ``N * k_blocks`` floats; ``zero_points`` (asymmetric only) as ``ceil(k_blocks / 2)``
bytes per column, packed the same way, or as ``N * k_blocks`` floats (HQQ's); without them every zero point
is 8. So symmetric INT4 levels -8..7 are stored as 0..15 and need no zero points. At 8 bits (ONNX Runtime
1.22 and later) a byte holds one level, zero points are one byte each, and the default zero point is 128.
A Gemm's bias follows as an Add. A weight several layers read is packed once.

``accuracy_level`` 4 lets ONNX Runtime quantize A to int8 per block and compute on integers (4-5x faster
at one token on these machines, with an error of its own); 0 computes in float.

With ``kernel="custom"`` the same inputs and attributes (but ``accuracy_level``) go to qcompile's own
``ai.qcompile.BlockQuantMatMul`` (`qcompile.ops.block_quant_matmul`, the library `qcompile kernels build`
makes), which quantizes A the same way; it takes integer zero points only. The model's metadata then names
the library, so that `qcompile inspect` and a deployment can tell.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile import kernels
from qcompile.decisions import QUANT_SPEC_KEY, IntegerGrid, PerBlock, QuantSpec
from qcompile.graph import register_constant
from qcompile.notes import add_note
from qcompile.op_rules import reduction_axis
from qcompile.ops import block_quant_matmul

CONTRIB_DOMAIN = "com.microsoft"
BITS = (4, 8)  # MatMulNBits' 8 bits run on ONNX Runtime 1.22 and later


@dataclass(frozen=True)
class MatMulNBitsOptions:
    accuracy_level: int = 4
    custom: bool = False  # BlockQuantMatMul (qcompile's library) instead of MatMulNBits


@dataclass(frozen=True)
class PackedWeight:
    """A weight as MatMulNBits reads it."""

    data: np.ndarray  # uint8 (N, k_blocks, block_size * bits // 8)
    scales: np.ndarray  # float32 (N * k_blocks,)
    # uint8 levels (N * ceil(k_blocks * bits / 8),), float32 (N * k_blocks,) for HQQ's float ones, None (symmetric)
    zero_points: np.ndarray | None
    k: int
    n: int
    block_size: int
    bits: int


def pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit levels (..., 2m) -> bytes (..., m), element 2j in the low nibble of byte j."""
    levels = levels.astype(np.uint8)
    return (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)


def pack_weight(weight: np.ndarray, spec: QuantSpec) -> PackedWeight:
    """``weight`` (2-D, float) quantized by ``spec`` (4 or 8 bits, blocks along its axis) in MatMulNBits' layout."""
    granularity = spec.granularity
    bits = spec.grid.bits
    assert isinstance(granularity, PerBlock) and bits in BITS
    block_size = granularity.block_size
    levels = spec.quantize(weight).astype(np.int16)
    scales, zero_points = spec.stored_scale(), spec.zero_point
    if granularity.axis == 0:  # (K, N) -> rows per output column
        levels, scales, zero_points = levels.T, scales.T, zero_points.T
    n, k = levels.shape
    k_blocks = scales.shape[1]
    # signed levels stored unsigned, around MatMulNBits' default zero point (8, or 128 at 8 bits)
    offset = 2 ** (bits - 1) if spec.grid.signed else 0
    # a short last block padded with its zero point's level (HQQ's float ones may lie off the grid)
    padding = np.clip(np.rint(zero_points.astype(np.float64)), *spec.grid.bounds).astype(np.int16) + offset
    padded = np.repeat(padding, block_size, axis=1)
    padded[:, :k] = levels + offset
    data = padded.reshape(n, k_blocks, block_size).astype(np.uint8)
    packed_zero_points = None
    if bits == 4:
        data = pack_nibbles(data)
    if zero_points.dtype.kind == "f":
        packed_zero_points = zero_points.astype(np.float32).reshape(-1)
    elif not spec.symmetric and bits == 8:
        packed_zero_points = zero_points.astype(np.uint8).reshape(-1)
    elif not spec.symmetric:
        even = np.full((n, k_blocks + k_blocks % 2), 8, np.int16)
        even[:, :k_blocks] = zero_points.astype(np.int16)
        packed_zero_points = pack_nibbles(even).reshape(-1)
    return PackedWeight(data, scales.astype(np.float32).reshape(-1), packed_zero_points, k, n, block_size, bits)


def layers_with_spec(graph: ir.Graph, accepts) -> list[tuple[ir.Node, ir.Value]]:
    """The MatMul / Gemm nodes whose weight carries a spec that ``accepts``, each with that weight."""
    layers = []
    for node in graph:
        weight = node.inputs[1] if reduction_axis(node) is not None else None
        if weight is not None and accepts(weight.meta.get(QUANT_SPEC_KEY)):
            layers.append((node, weight))
    return layers


def ensure_lowered(model: ir.Model, accepts, what: str) -> None:
    """A postcondition: no weight left with a spec that ``accepts``."""
    left = [v.name for v in model.graph.initializers.values() if accepts(v.meta.get(QUANT_SPEC_KEY))]
    if left:
        raise ir.passes.PostconditionError(f"{what} not lowered: {', '.join(left[:5])}")


def release_weights(graph: ir.Graph, weights) -> None:
    """The lowered ``weights``' specs dropped, and those no node reads any more removed."""
    for weight in weights:
        del weight.meta[QUANT_SPEC_KEY]
        if not weight.uses():
            graph.initializers.pop(weight.name)


def _is_nbits_block(spec) -> bool:
    return isinstance(spec, QuantSpec) and isinstance(spec.granularity, PerBlock) and \
        isinstance(spec.grid, IntegerGrid) and spec.grid.bits in BITS


class LowerMatMulNBitsPass(ir.passes.InPlacePass):
    """Replace each MatMul / Gemm on a 4- or 8-bit block-quantized weight by a MatMulNBits or BlockQuantMatMul (and a
    Gemm's bias Add)."""

    name = "lower-matmul-nbits"

    def __init__(self, options: MatMulNBitsOptions = MatMulNBitsOptions()):
        super().__init__()
        self.options = options

    def ensures(self, model: ir.Model) -> None:
        ensure_lowered(model, _is_nbits_block, "block specs")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        packed: dict[ir.Value, tuple[PackedWeight, list[ir.Value]]] = {}  # weight -> its MatMulNBits inputs
        lowered = 0
        for node, weight in layers_with_spec(graph, _is_nbits_block):
            if weight not in packed:
                packed[weight] = _initializers(graph, weight)
            self._replace(graph, node, *packed[weight])
            lowered += 1
        release_weights(graph, packed)
        if lowered:
            model.opset_imports.setdefault(self._domain, 1)
        if lowered and self.options.custom:
            model.metadata_props[kernels.METADATA_KEY] = f"{block_quant_matmul.DOMAIN}: {block_quant_matmul.OP_TYPE}"
        if floats := sum(weight.zero_points is not None and weight.zero_points.dtype == np.float32
                         for weight, _ in packed.values()):
            add_note(model, f"{floats} MatMulNBits weight(s) with float zero points (HQQ's): ONNX Runtime's CPU "
                     f"kernels run them slower than integer ones (SmolLM2, 128 tokens: 1.46x fp32 where round to "
                     f"nearest runs 0.83x, AMD EPYC with VNNI)")
        if (eight := sum(weight.bits == 8 for weight, _ in packed.values())) and not self.options.custom:
            add_note(model, f"{eight} MatMulNBits weight(s) at 8 bits: ONNX Runtime runs them from version 1.22 "
                     f"(head_bits=4 for older ones)")
        return ir.passes.PassResult(model, modified=bool(lowered))

    @property
    def _domain(self) -> str:
        return block_quant_matmul.DOMAIN if self.options.custom else CONTRIB_DOMAIN

    def _replace(self, graph: ir.Graph, node: ir.Node, weight: PackedWeight, inputs: list[ir.Value]) -> None:
        attributes = {"K": weight.k, "N": weight.n, "bits": weight.bits, "block_size": weight.block_size}
        if self.options.custom:
            assert weight.zero_points is None or weight.zero_points.dtype == np.uint8, "float zero points"
            replace_layer(graph, node, block_quant_matmul.OP_TYPE, inputs, attributes, block_quant_matmul.DOMAIN)
        else:
            replace_layer(graph, node, "MatMulNBits", inputs,
                          {**attributes, "accuracy_level": self.options.accuracy_level})


def replace_layer(graph: ir.Graph, node: ir.Node, op_type: str, weight_inputs: list[ir.Value], attributes: dict,
                  domain: str = CONTRIB_DOMAIN) -> ir.Node:
    """Replace the MatMul / Gemm ``node`` by ``op_type`` (of ``domain``) on its activation and ``weight_inputs``, and
    a Gemm's bias by an Add after it; the ``op_type`` node."""
    matmul = ir.node(op_type, [node.inputs[0], *weight_inputs], attributes, domain=domain, name=node.name)
    new_nodes = [matmul]
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        new_nodes.append(ir.node("Add", [matmul.outputs[0], bias], name=f"{node.name}_bias"))
    output = node.outputs[0]
    new_nodes[-1].outputs[0].type, new_nodes[-1].outputs[0].shape = output.type, output.shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [output], [new_nodes[-1].outputs[0]])
    return matmul


def _initializers(graph: ir.Graph, weight: ir.Value) -> tuple[PackedWeight, list[ir.Value]]:
    packed = pack_weight(weight.const_value.numpy(), weight.meta[QUANT_SPEC_KEY])
    inputs = [register_constant(graph, f"{weight.name}_{packed.bits}bit", packed.data),
              register_constant(graph, f"{weight.name}_scales", packed.scales)]
    if packed.zero_points is not None:
        inputs.append(register_constant(graph, f"{weight.name}_zero_points", packed.zero_points))
    return packed, inputs
