import numpy as np
import pytest
from helpers import apply, clone, op_types, random_feed, run

from qcompile.models import synthetic
from qcompile.passes import AssignWeightSpecsPass, EliminateDeadCodePass, FuseDynamicMatMulPass, \
    FuseMatMulAddPass, QuantizeWeightsPass
from qcompile.passes.analysis.assign_weight_specs import WeightSpecOptions


def _sqnr(expected, actual):
    return 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))


def _lower(model, contrib):
    return apply(model, FuseMatMulAddPass(), AssignWeightSpecsPass(WeightSpecOptions(qmax=63)), QuantizeWeightsPass(),
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


def test_biases_of_token_matmuls_go_into_the_fused_op():
    model = synthetic.transformer_block()  # 3-D MatMul + Add: not turned into Gemm
    reference = clone(model)

    assert _lower(model, contrib=True)

    fused = [n for n in model.graph if n.op_type == "DynamicQuantizeMatMul"]
    assert len(fused) == 6 and all(len(n.inputs) == 5 for n in fused)
    assert not any(n.op_type == "Add" and n.inputs[0].producer() in fused for n in model.graph)
    feed = random_feed(model, batch=2)
    assert _sqnr(run(reference, feed)[0], run(model, feed)[0]) > 25
