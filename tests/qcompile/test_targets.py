import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile.session import session
from qcompile.decisions import symmetric_weight_spec
from qcompile.targets import TARGETS, get_target
from qcompile.targets.x86 import PAIR_LIMIT, PairSumLimit, cpu_profile, has_vnni, reduction_axes, worst_pair_sum

import onnx_ir as ir


def saturating_u8s8_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What AVX2's VPMADDUBSW-based u8 x s8 kernels compute: products summed in pairs along K with
    int16 saturation, then accumulated in int32. Emulated so that a VNNI test machine checks it too."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def test_emulation_shows_the_trap_with_full_range_weights():
    a = np.full((1, 4), 255, np.uint8)
    b = np.full((4, 1), 127, np.int8)
    assert saturating_u8s8_matmul(a, b)[0, 0] == 2 * 32767
    assert (a.astype(np.int32) @ b.astype(np.int32))[0, 0] == 4 * 255 * 127


def _integer_weights(tmp_path, recipe, cpu):
    source = tmp_path / "mlp.onnx"
    save_model(synthetic.mlp(), source)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    result = qcompile.compile(source, recipe=recipe, calib=str(tmp_path / "calib.npz"), options={"cpu": cpu})
    return [v.const_value.numpy() for v in result.model.graph.initializers.values()
            if v.const_value is not None and v.const_value.numpy().dtype in (np.int8, np.uint8)
            and v.const_value.numpy().ndim == 2]


def _exact_under_avx2_saturation(w: np.ndarray) -> None:
    worst = np.full((3, w.shape[0]), 255, np.uint8)  # every activation at the top of its u8 range
    for signs in (1, -1):  # and their products with the weights of either sign
        np.testing.assert_array_equal(saturating_u8s8_matmul(worst, signs * w.astype(np.int32)),
                                      worst.astype(np.int32) @ (signs * w.astype(np.int32)))


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_default_weights_are_8_bit_with_pairs_that_never_saturate(tmp_path, recipe):
    weights = _integer_weights(tmp_path, recipe, "any")
    assert weights and all(w.dtype == np.int8 for w in weights)
    assert max(np.abs(w).max() for w in weights) > 64  # more than 7 bits
    for w in weights:
        assert worst_pair_sum(w, (0,)) <= PAIR_LIMIT
        _exact_under_avx2_saturation(w)


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_u8u8_weights_are_unsigned_so_no_u8s8_kernel_runs(tmp_path, recipe):
    weights = _integer_weights(tmp_path, recipe, "u8u8")
    assert weights and all(w.dtype == np.uint8 for w in weights)
    assert max(np.abs(w.astype(int) - 128).max() for w in weights) == 127


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_7bit_weights_are_exact_under_avx2_saturation(tmp_path, recipe):
    weights = _integer_weights(tmp_path, recipe, "7bit")
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 63 for w in weights)
    for w in weights:
        _exact_under_avx2_saturation(w)


def test_pair_limited_spec_keeps_pairs_within_the_limit_along_the_conv_kernel_order():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 5, 3, 3)).astype(np.float32)
    weight[0, :, 1, 1] = 4.0  # neighbours along C at one tap: a pair far over the limit at min/max scale
    axes = reduction_axes("Conv", weight.shape)
    assert axes == (2, 3, 1)
    spec = symmetric_weight_spec(weight, 0, ir.DataType.INT8, 127, PairSumLimit(PAIR_LIMIT, axes))
    q = spec.quantize(weight)
    assert worst_pair_sum(q, axes) <= PAIR_LIMIT
    assert worst_pair_sum(symmetric_weight_spec(weight, 0, ir.DataType.INT8, 127).quantize(weight), axes) > 200
    # the limit coarsens the channel that needs it, not the others
    plain = symmetric_weight_spec(weight, 0, ir.DataType.INT8, 127)
    assert spec.scale[0] > plain.scale[0] and np.allclose(spec.scale[1:], plain.scale[1:], rtol=0.7)
    assert np.abs(spec.dequantize(q) - weight).max() <= spec.scale.max() / 2 + 1e-6
    assert reduction_axes("Conv", (16, 1, 3, 3), group=16) is None  # depthwise: 32-bit sums


# ONNX Runtime's kernels must agree with `reduction_axes`: weights whose pairs in that order are within
# the limit (and far over it in any other pairing) against activations all at 255. On a CPU without
# VNNI a wrong pairing saturates; with VNNI everything is exact and the test still checks the numbers.
def _adversarial(k: int, n: int, rng) -> np.ndarray:
    """(k, n) INT8 weights: pairs (2i, 2i+1) sum to exactly 128, pairs (2i+1, 2i+2) to 254."""
    magnitude = np.where(np.isin(np.arange(k) % 4, (1, 2)), 127, 1)[:, None]
    return (magnitude * rng.choice([-1, 1], size=(1, n))).astype(np.int8)


def _session(node, inputs, initializers, output_type):
    graph = helper.make_graph([node], "probe", inputs, [helper.make_tensor_value_info("y", output_type, None)],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("m, k, n", [(1, 64, 16), (33, 300, 70), (4, 1536, 96)])
def test_onnx_runtime_matmul_kernels_pair_along_k(m, k, n):
    rng = np.random.default_rng(k)
    w = _adversarial(k, n, rng)
    assert worst_pair_sum(w, reduction_axes("MatMul", w.shape)) == PAIR_LIMIT
    a = np.full((m, k), 255, np.uint8)
    sess = _session(helper.make_node("MatMulInteger", ["a", "w"], ["y"]),
                    [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])], {"w": w}, TensorProto.INT32)
    np.testing.assert_array_equal(sess.run(None, {"a": a})[0], a.astype(np.int64) @ w.astype(np.int64))
    x = np.full((m, k), 2.0, np.float32)  # quantized to 255 by the op
    x[:, 0] = 0.0
    sess = _session(helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["y"], domain="com.microsoft"),
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                    {"w": w, "s": np.ones(n, np.float32), "z": np.zeros(n, np.int8)}, TensorProto.FLOAT)
    q = np.rint(x / (2.0 / 255))
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], (q @ w.astype(np.float64)) * (2.0 / 255), rtol=1e-5)
    transposed = np.ascontiguousarray(w.T)  # QGemm with transB = 1: pairs along K, the weight's axis 1
    assert worst_pair_sum(transposed, reduction_axes("QGemm", transposed.shape, trans_b=True)) == PAIR_LIMIT
    sess = _session(helper.make_node("QGemm", ["a", "one", "zero", "w", "s", "z"], ["y"], domain="com.microsoft",
                                      transB=1),
                    [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                    {"one": np.array(1.0, np.float32), "zero": np.array(0, np.uint8), "w": transposed,
                     "s": np.ones(n, np.float32), "z": np.zeros(n, np.int8)}, TensorProto.FLOAT)
    np.testing.assert_array_equal(sess.run(None, {"a": a})[0], a.astype(np.float64) @ w.astype(np.float64))


@pytest.mark.parametrize("channels, outputs, kernel, group", [(64, 32, 1, 1), (66, 32, 3, 1), (3, 32, 3, 1),
                                                               (64, 64, 3, 2), (48, 48, 3, 48)])
def test_onnx_runtime_conv_kernels_pair_along_kh_kw_c(channels, outputs, kernel, group):
    rng = np.random.default_rng(channels)
    per_group = channels // group
    if group == channels:  # depthwise: full-range weights of one sign, no pair limit needed
        w = np.full((outputs, 1, kernel, kernel), 127, np.int8) * rng.choice([-1, 1], size=(outputs, 1, 1, 1)).astype(np.int8)
    else:  # (O, kh, kw, C) flattened is the kernel order
        w = np.ascontiguousarray(_adversarial(kernel * kernel * per_group, outputs, rng).T
                                 .reshape(outputs, kernel, kernel, per_group).transpose(0, 3, 1, 2))
        assert worst_pair_sum(w, reduction_axes("Conv", w.shape, group)) == PAIR_LIMIT
    x = np.full((1, channels, 7, 7), 255, np.uint8)
    exact = np.einsum("gc,goc->go", x[0, :, 0, 0].reshape(group, per_group).astype(np.int64),
                      w.reshape(group, outputs // group, per_group, -1).sum(-1).astype(np.int64)).reshape(-1)
    scale = np.abs(exact).max() / 100  # about 100 output levels: a saturated pair (> 30000) moves many of them
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], group=group)
    sess = _session(node, [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
                    {"xs": np.array(1.0, np.float32), "xz": np.array(0, np.uint8), "w": w,
                     "ws": np.ones(outputs, np.float32), "wz": np.zeros(outputs, np.int8),
                     "ys": np.array(scale, np.float32), "yz": np.array(128, np.uint8)}, TensorProto.UINT8)
    center = sess.run(None, {"x": x})[0][0, :, 3 - kernel // 2, 3 - kernel // 2].astype(int)  # no padding there
    np.testing.assert_array_equal(center, np.clip(np.rint(exact / scale) + 128, 0, 255))


def test_cpu_profiles_and_detection():
    assert (cpu_profile("any").weight_dtype, cpu_profile("any").pair_limit) == ("int8", PAIR_LIMIT)
    assert (cpu_profile("u8u8").weight_dtype, cpu_profile("u8u8").weight_qmax) == ("uint8", 127)
    assert (cpu_profile("vnni").weight_dtype, cpu_profile("vnni").pair_limit) == ("int8", None)
    assert cpu_profile("7bit").weight_qmax == 63
    assert cpu_profile("native").choice in ("vnni", "avx2")
    with pytest.raises(UsageError, match="option cpu"):
        cpu_profile("pentium")
    if __import__("platform").machine() == "x86_64":
        assert has_vnni("flags\t: fpu avx2 avx512_vnni") and has_vnni("flags\t: avx2 avx_vnni")
        assert not has_vnni("flags\t: fpu sse avx2 fma")


def test_targets_are_objects_that_open_sessions_as_their_runtime_computes(tmp_path):
    assert get_target("tensorrt").activation_dtype == ir.DataType.INT8 and not get_target("tensorrt").contrib_ops
    assert get_target("ort-cpu").qoperator and get_target("ort-cpu").cpu_kernels
    with pytest.raises(UsageError, match="unknown target 'tpu'"):
        get_target("tpu")
    path = save_model(synthetic.mlp(), tmp_path / "mlp.onnx")
    assert TARGETS["tensorrt"].session(path).get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # Q/DQ as ONNX defines them: no integer fusions
    assert TARGETS["ort-cpu"].custom_op_domains == ("ai.qcompile",) and not TARGETS["ort-cuda"].custom_op_domains
    with pytest.raises(UsageError, match="missing.so: ONNX Runtime cannot load this custom-op library"):
        session(path, libraries=[tmp_path / "missing.so"])
