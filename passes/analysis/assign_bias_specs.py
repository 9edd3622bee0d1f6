"""Decide INT32 bias quantization for Conv / Gemm whose input and weight are both quantized."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import constant_array
from qcompile.notes import add_note
from qcompile.decisions import (INTEGER_KERNEL_DTYPES, MAX_BIAS_LEVEL, QUANT_SPEC_KEY, DerivedSpec, IntegerGrid, PerAxis, PerTensor,
                                QuantSpec)


class AssignBiasSpecsPass(ir.passes.InPlacePass):
    """bias_q = round(bias / (scale_x * scale_w)) in INT32, zero point 0, per output channel: a spec
    derived from the final specs of the input and the weight.

    That is the scale an integer Conv/Gemm accumulates in, so ONNX Runtime can fuse the
    DequantizeLinear -> Conv -> QuantizeLinear group into one QLinearConv with its bias. Only for 8-bit
    inputs: with a 16-bit one the op runs in float, and the tiny x scale could overflow INT32.
    """

    name = "assign-bias-specs"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type not in ("Conv", "Gemm") or node.domain != "" or len(node.inputs) < 3:
                continue
            x, weight, bias = node.inputs[0], node.inputs[1], node.inputs[2]
            x_spec, w_spec = x.meta.get(QUANT_SPEC_KEY), weight.meta.get(QUANT_SPEC_KEY)
            array = constant_array(bias)
            if x_spec is None or w_spec is None or array is None or array.ndim != 1:
                continue
            if x_spec.dtype not in INTEGER_KERNEL_DTYPES:
                continue  # the op runs in float, bias and all
            if QUANT_SPEC_KEY in bias.meta or any(user is not node for user, _ in bias.uses()):
                continue
            if node.op_type == "Gemm" and (node.attributes.get_float("beta", 1.0) != 1.0
                                           or node.attributes.get_int("transA", 0)):
                continue
            largest = float(np.max(np.abs(array) / (x_spec.scale * w_spec.scale)))
            if largest > MAX_BIAS_LEVEL:
                add_note(model, f"{node.name}: bias left float: its INT32 grid (step = input step x weight step) "
                                f"would need {largest:.3g} levels, more than {MAX_BIAS_LEVEL:.3g}; ONNX Runtime "
                                f"then runs the op in float, its weight dequantized")
                continue
            bias.meta[QUANT_SPEC_KEY] = DerivedSpec((x, weight), _accumulator_spec)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _accumulator_spec(x_spec: QuantSpec, w_spec: QuantSpec) -> QuantSpec:
    scale = (x_spec.scale * w_spec.scale).astype(np.float32)
    return QuantSpec(IntegerGrid(ir.DataType.INT32), scale, np.zeros(scale.shape, np.int32),
                     PerAxis(0) if scale.ndim == 1 else PerTensor(), method="bias")
