import numpy as np
import onnx_ir as ir
import pytest
from helpers import apply, clone, op_types, random_feed, run

from qcompile.targets.x86 import cpu_profile
from qcompile.layers import layer_precisions
from qcompile.models import synthetic
from qcompile.notes import notes
from qcompile.passes.analysis.assign_weight_specs import AssignWeightSpecsPass
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.canonicalize.fuse_matmul_add import FuseMatMulAddPass
from qcompile.passes.lowering.fuse_dynamic_matmul import FuseDynamicMatMulPass
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.passes.analysis.assign_weight_specs import WeightSpecOptions
from qcompile.passes.lowering.fuse_dynamic_matmul import rules


def _sqnr(expected, actual):
    return 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))


def _lower(model, contrib):
    return apply(model, FuseMatMulAddPass(), AssignWeightSpecsPass(WeightSpecOptions(cpu=cpu_profile("7bit"))), QuantizeWeightsPass(),
                 FuseDynamicMatMulPass(contrib=contrib), EliminateDeadCodePass())


def test_contrib_lowering_uses_dynamic_quantize_matmul_with_bias():
    model = synthetic.mlp()
    reference = clone(model)

    assert _lower(model, contrib=True)

    assert op_types(model) == ["DynamicQuantizeMatMul", "Relu"] * 3 + ["DynamicQuantizeMatMul"]
    fused = [n for n in model.graph if n.op_type == "DynamicQuantizeMatMul"]
    assert [len(n.inputs) for n in fused] == [5, 5, 5, 4]  # biases folded in, the head has none
    assert {n.name for n in fused} == {"fc0", "fc1", "fc2", "head"}
    weights = [n.inputs[1].const_value.numpy() for n in fused]
    assert all(w.dtype == np.int8 and np.abs(w).max() == 63 for w in weights)
    feed = random_feed(model, batch=4)
    assert _sqnr(run(reference, feed)[0], run(model, feed)[0]) > 25
    assert not FuseDynamicMatMulPass(contrib=True)(model).modified


@pytest.mark.parametrize("build", [synthetic.mlp, synthetic.transformer_block])
def test_standard_op_lowering_is_portable_and_accurate(build):
    model = build()
    reference = clone(model)

    assert _lower(model, contrib=False)

    assert all(n.domain == "" for n in model.graph)
    assert "MatMulInteger" in op_types(model) and "DynamicQuantizeLinear" in op_types(model)
    layers = {n.name for n in model.graph if n.op_type == "MatMulInteger"}
    assert layers and all(not name.startswith("node_") for name in layers)
    feed = random_feed(model, batch=2)
    assert _sqnr(run(reference, feed)[0], run(model, feed)[0]) > 25


def test_activation_matmuls_and_excluded_weights_stay_float():
    model = synthetic.transformer_block()
    apply(model, AssignWeightSpecsPass(WeightSpecOptions(exclude=("fc2",))), QuantizeWeightsPass(),
          FuseDynamicMatMulPass(contrib=True), EliminateDeadCodePass())
    matmuls = {n.name for n in model.graph if n.op_type == "MatMul"}
    assert matmuls == {"scores", "context", "fc2"}


def test_biases_of_token_matmuls_go_into_the_fused_ops_and_qkv_share_one_quantization():
    model = synthetic.transformer_block()  # 3-D MatMul + Add: not turned into Gemm
    reference = clone(model)

    assert _lower(model, contrib=True)

    unshared = clone(reference)
    apply(unshared, FuseMatMulAddPass(), AssignWeightSpecsPass(WeightSpecOptions(cpu=cpu_profile("7bit"))), QuantizeWeightsPass())
    for rule_set in rules(contrib=True):
        rule_set.apply_to_model(unshared)
    shared = [n for n in model.graph if n.op_type == "MatMulIntegerToFloat"]
    separate = [n for n in model.graph if n.op_type == "DynamicQuantizeMatMul"]
    assert len(shared) == 3 and len(separate) == 3  # q/k/v; o_proj, fc1, fc2
    assert len({n.inputs[0] for n in shared}) == 1 and shared[0].inputs[0].producer().op_type == "DynamicQuantizeLinear"
    assert all(len(n.inputs) == 7 for n in shared) and all(len(n.inputs) == 5 for n in separate)  # with biases
    assert shared[0].inputs[0].dtype == ir.DataType.UINT8
    assert {row["precision"] for row in layer_precisions(model) if row["op_type"] != "MatMul"} == {
        "w:int8 a:uint8-dynamic"}
    assert not any(n.op_type == "Add" and n.inputs[0].producer() in shared + separate for n in model.graph)
    feed = random_feed(model, batch=2)
    np.testing.assert_allclose(run(model, feed)[0], run(unshared, feed)[0], rtol=1e-5, atol=1e-6)
    assert _sqnr(run(reference, feed)[0], run(model, feed)[0]) > 25
    assert not FuseDynamicMatMulPass(contrib=True)(model).modified


def test_convolutions_stay_float_and_the_report_counts_them():
    model = synthetic.cnn()
    apply(model, AssignWeightSpecsPass(WeightSpecOptions(op_types=("MatMul", "Gemm"))), QuantizeWeightsPass(),
          FuseDynamicMatMulPass(contrib=True), EliminateDeadCodePass())

    assert op_types(model).count("Conv") == 3 and "DynamicQuantizeMatMul" in op_types(model)
    assert notes(model) == ["3 layers left float (3 Conv): this recipe quantizes the weights of MatMul and Gemm only"]
