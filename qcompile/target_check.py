"""Static checks: what in a model a deployment target would reject, or run wrongly.

* every target: ops of domains the target's runtime does not know (ONNX Runtime knows
  com.microsoft; `tensorrt` and `portable` take standard ONNX only);
* `tensorrt`: integer ops (QLinearConv, MatMulInteger, ...) where it expects Q/DQ, Q/DQ that are
  not symmetric INT8 with zero point 0, per-channel weight scales on another axis than the output
  channels;
* `ort-cpu` (and `portable`, which ONNX Runtime's CPU kernels may run): u8 x s8 products with
  same-signed weight pairs beyond 128, which saturate in the int16 pair sums of the AVX2 kernels of
  CPUs without VNNI (KERNELS.md, `qcompile.targets.x86`); u8 x u8, 7-bit and pair-limited weights are
  exact everywhere.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.errors import UsageError
from qcompile.graph import all_nodes, constant_array
from qcompile.op_rules import weight_axis
from qcompile.targets import STANDARD_DOMAINS, Target
from qcompile.targets.x86 import PAIR_LIMIT, has_vnni, reduction_axes, worst_pair_sum

# Integer-arithmetic ops: the input indices of their (constant) weight and its zero point.
INTEGER_OPS = {"ConvInteger": (1, 3), "MatMulInteger": (1, 3), "QLinearConv": (3, 5), "QLinearMatMul": (3, 5),
               "QGemm": (3, 5), "DynamicQuantizeMatMul": (1, 3), "MatMulIntegerToFloat": (1, 5)}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def target_problems(model: ir.Model, target: Target, vnni_only: bool = False) -> list[str]:
    """One line per problem, naming the node; empty if the target takes the model as it is.
    ``vnni_only``: the model deploys on CPUs with VNNI only, where u8 x s8 pairs do not saturate."""
    problems = []
    for node in all_nodes(model):
        where = f"{node.name or '(unnamed)'} ({_op(node)})"
        if node.domain not in target.domains:
            problems.append(f"{where}: not an op {target.name} runs ({node.domain or 'ai.onnx'} domain)")
        if target.symmetric_int8_only:
            problems.extend(f"{where}: {p}" for p in _tensorrt(node))
        if target.cpu_kernels and not vnni_only:
            problems.extend(f"{where}: {p}" for p in _avx2_saturation(node))
    return problems


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", *INTEGER_OPS}


def check_already_quantized(model: ir.Model, path, target: Target, vnni_only: bool) -> str | None:
    """For a model that is quantized already (the Q/DQ output of ONNX Runtime's quantizer, Quark, a QAT
    export): a note if ``target`` runs its quantized ops as they are (compiling keeps them), else a
    usage error naming the first op the target would reject or compute wrongly. None for a float model."""
    count = sum(node.op_type in QUANTIZED_OPS for node in all_nodes(model))
    if not count:
        return None
    problems = target_problems(model, target, vnni_only)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        vnni = (", or take it as it is for CPUs with VNNI only with --option cpu=vnni"
                if any("saturate" in p for p in problems) else "")
        raise UsageError(f"{path}: already quantized ({count} Q/DQ and integer ops), in a form {target.name} cannot "
                         f"run as it is: {problems[0]}{more}; compile the float model instead{vnni}")
    return (f"the input was already quantized ({count} Q/DQ and integer ops): those were kept as they are "
            f"(their scales not re-calibrated)")


def checked_on(model: ir.Model, target: Target) -> str:
    """How ``model``, compiled for ``target``, is run when checked on this machine (`Target.checked_on`),
    and whether this CPU computes its integer ops worse than ``target``."""
    line = target.checked_on
    if target.qdq_semantics and not has_vnni():
        saturating = [node for node in all_nodes(model) if node.op_type in INTEGER_OPS and _avx2_saturation(node)]
        if saturating:
            line += (f"; but its {len(saturating)} integer ops ({_op(saturating[0])} {saturating[0].name}, ...) ran "
                     f"on this CPU's u8 x s8 kernels, which saturate without VNNI: the error shown is larger than "
                     f"{target.name}'s")
    return line


def _op(node: ir.Node) -> str:
    return node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def _tensorrt(node: ir.Node) -> list[str]:
    if node.op_type in INTEGER_OPS:
        return ["TensorRT takes quantization as QuantizeLinear/DequantizeLinear, not integer ops"]
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in STANDARD_DOMAINS:
        return []
    problems = []
    dtype = _quantized_dtype(node) if node.op_type == "DequantizeLinear" else _quantize_dtype(node)
    array = constant_array(_input(node, 2))
    if dtype == ir.DataType.INT32:
        problems.append("TensorRT takes float biases, not INT32 ones behind a DequantizeLinear")
    elif dtype not in _tensorrt_types(node) or (array is not None and np.any(array != 0)):
        problems.append(f"TensorRT needs symmetric INT8 or FP8 E4M3 (zero point 0), or INT4 weights, got {dtype.name}"
                        + (" with a non-zero zero point" if array is not None and np.any(array != 0) else ""))
    if node.op_type == "DequantizeLinear" and constant_array(node.inputs[0]) is not None:
        axis = node.attributes.get_int("axis", 1)
        per_channel = node.inputs[1].shape is not None and node.inputs[1].shape.rank() == 1
        for user, index in node.outputs[0].uses():
            expected = weight_axis(user) if index == 1 else None
            if per_channel and expected is not None and axis % node.inputs[0].shape.rank() != expected:
                problems.append(f"per-channel weight scales on axis {axis}; TensorRT wants the output "
                                f"channels of {user.name} (axis {expected})")
    return problems


def _tensorrt_types(dequantize: ir.Node) -> tuple[ir.DataType, ...]:
    """INT8 and FP8 E4M3FN, and INT4 for a constant weight behind a DequantizeLinear (weight-only quantization)."""
    weight_only = dequantize.op_type == "DequantizeLinear" and constant_array(dequantize.inputs[0]) is not None
    both = (ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN)
    return (*both, ir.DataType.INT4) if weight_only else both


def _avx2_saturation(node: ir.Node) -> list[str]:
    """u8 x s8 with weight pairs beyond `PAIR_LIMIT`, in integer ops or in a DequantizeLinear -> Conv/MatMul/Gemm group."""
    if node.op_type in INTEGER_OPS:
        weight_index, zero_point_index = INTEGER_OPS[node.op_type]
        weight, zero_point = _input(node, weight_index), _input(node, zero_point_index)
        # DynamicQuantizeMatMul quantizes its float input to UINT8 itself.
        activation = ir.DataType.UINT8 if node.op_type == "DynamicQuantizeMatMul" else node.inputs[0].dtype
    elif (node.op_type in WEIGHTED_OPS and node.domain in STANDARD_DOMAINS and len(node.inputs) > 1
          and _dequantized(node.inputs[0]) and _dequantized(node.inputs[1])):
        weight_dq = _dequantized(node.inputs[1])
        weight, zero_point = weight_dq.inputs[0], _input(weight_dq, 2)
        activation = _quantized_dtype(_dequantized(node.inputs[0]))
    else:
        return []
    weight, zero_point = constant_array(weight), constant_array(zero_point)
    # INT8 activations are shifted to UINT8 by ONNX Runtime's x86 kernels: the same pair sums.
    if weight is None or weight.dtype != np.int8 or activation not in (ir.DataType.UINT8, ir.DataType.INT8):
        return []
    if zero_point is not None and np.any(zero_point != zero_point.flat[0]):
        return []  # distinct per-channel zero points: not a layout qcompile or ONNX Runtime's quantizer writes
    axes = reduction_axes(node.op_type, weight.shape, node.attributes.get_int("group", 1),
                          bool(node.attributes.get_int("transB", 0)))
    if axes is None:
        return []
    center = 0 if zero_point is None else int(zero_point.flat[0])
    largest = worst_pair_sum(weight.astype(np.int32) - center, axes)
    if largest <= PAIR_LIMIT:
        return []
    return [f"u8 x s8 with INT8 weight pairs adding up to {largest} (> {PAIR_LIMIT}): saturates on x86 CPUs without "
            f"VNNI (AVX2); compile with --option cpu=any"]


def _quantized_dtype(dequantize: ir.Node) -> ir.DataType:
    """The integer type a DequantizeLinear reads (a file may not record it on intermediate values)."""
    zero_point = _input(dequantize, 2)
    return (dequantize.inputs[0].dtype or (zero_point.dtype if zero_point is not None else None)
            or ir.DataType.UINT8)


def _quantize_dtype(quantize: ir.Node) -> ir.DataType:
    zero_point = _input(quantize, 2)
    return zero_point.dtype if zero_point is not None and zero_point.dtype else ir.DataType.UINT8


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _dequantized(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing ``value``, if one does."""
    producer = value.producer() if value is not None else None
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None
