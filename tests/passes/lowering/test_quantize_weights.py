import numpy as np
import pytest
from helpers import apply, clone, op_types, parse, random_feed, run

from qcompile.models import synthetic
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.passes.analysis.assign_weight_specs import WeightSpecOptions
from qcompile.decisions import QUANT_SPEC_KEY

TIED = """
<ir_version: 10, opset_import: ["" : 18]>
g (int64[2] ids, float[2, 4] x) => (float[2, 4] e, float[2, 3] y) <float[3, 4] table = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[4, 3] w = {1, -2, 3, 4, 5, -6, 7, 8, 9, 10, -11, 12}> {
    e = Gather(table, ids)
    y = MatMul(x, w)
}
"""


@pytest.mark.parametrize("build", [synthetic.mlp, synthetic.cnn, synthetic.transformer_block])
def test_weights_become_int8_behind_dequantize_within_quantization_error(build):
    model = build()
    reference = clone(model)
    weights = {n.name: n.inputs[1].const_value.numpy() for n in model.graph
               if n.op_type in ("MatMul", "Gemm", "Conv") and n.inputs[1].const_value is not None}

    assert apply(model, AssignWeightSpecsPass(), QuantizeWeightsPass())

    for node in model.graph:
        if node.name in weights:
            dq = node.inputs[1].producer()
            assert dq.op_type == "DequantizeLinear"
            q, scale = dq.inputs[0].const_value.numpy(), dq.inputs[1].const_value.numpy()
            assert q.dtype == np.int8 and np.abs(q).max() == 127
            # Dequantized weight is within half a step of the float weight, per channel.
            axis = dq.attributes.get_int("axis", 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            error = np.abs(q * scale.reshape(shape) - weights[node.name])
            assert np.all(error <= scale.reshape(shape) / 2 + 1e-7)
    feed = random_feed(model)
    expected, actual = run(reference, feed)[0], run(model, feed)[0]
    sqnr = 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))
    assert sqnr > 30
    assert not AssignWeightSpecsPass()(model).modified
    assert not QuantizeWeightsPass()(model).modified


def test_weight_read_by_another_op_stays_float_and_is_noted():
    model = parse(TIED.replace("y = MatMul(x, w)", "y = MatMul(x, w)\n    e2 = Gather(w, ids)"))
    assert not apply(model, AssignWeightSpecsPass(), QuantizeWeightsPass())
    assert any("w: left float" in note for note in model.meta["qcompile.notes"])


def test_excluded_nodes_and_per_tensor_option():
    model = synthetic.mlp()
    apply(model, AssignWeightSpecsPass(WeightSpecOptions(per_channel=False, exclude=("head", "fc1*"))),
          QuantizeWeightsPass())
    quantized = {n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None}
    assert quantized == {"fc0", "fc2"}
    for name in quantized:
        dq = next(n for n in model.graph if n.name == name).inputs[1].producer()
        assert dq.inputs[1].const_value.numpy().shape == ()
        assert "axis" not in dq.attributes


def test_if_branch_weights_are_left_float_with_a_note():
    model = synthetic.with_if()
    assert apply(model, AssignWeightSpecsPass(), QuantizeWeightsPass())
    assert op_types(model) == ["ReduceSum", "Greater", "If", "DequantizeLinear", "MatMul"]
    assert any("control-flow" in note for note in model.meta["qcompile.notes"])


def test_all_zero_channel_gets_a_valid_scale():
    model = parse(TIED)
    model.graph.initializers["w"].const_value = __import__("onnx_ir").tensor(np.zeros((4, 3), np.float32))
    assert apply(model, AssignWeightSpecsPass())
    spec = model.graph.initializers["w"].meta[QUANT_SPEC_KEY]
    assert np.all(spec.scale > 0) and np.all(np.isfinite(spec.scale))
