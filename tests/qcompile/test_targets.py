import numpy as np
import pytest

import qcompile
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile.targets import cpu_profile, has_vnni


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


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_default_weights_are_unsigned_so_no_u8s8_kernel_runs(tmp_path, recipe):
    weights = _integer_weights(tmp_path, recipe, "any")
    assert weights and all(w.dtype == np.uint8 for w in weights)
    assert max(np.abs(w.astype(int) - 128).max() for w in weights) == 127


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_7bit_weights_are_exact_under_avx2_saturation(tmp_path, recipe):
    weights = _integer_weights(tmp_path, recipe, "7bit")
    assert weights and all(w.dtype == np.int8 for w in weights)
    worst = np.full((3, 64), 255, np.uint8)  # every activation at the top of its u8 range
    for w in weights:
        a = worst[:, : w.shape[0]]
        np.testing.assert_array_equal(saturating_u8s8_matmul(a, w), a.astype(np.int32) @ w.astype(np.int32))


def test_cpu_profiles_and_detection():
    assert (cpu_profile("any").weight_dtype, cpu_profile("any").weight_qmax) == ("uint8", 127)
    assert (cpu_profile("vnni").weight_dtype, cpu_profile("vnni").weight_qmax) == ("int8", 127)
    assert cpu_profile("7bit").weight_qmax == 63
    assert cpu_profile("native").choice in ("vnni", "avx2")
    with pytest.raises(UsageError, match="option cpu"):
        cpu_profile("pentium")
    if __import__("platform").machine() == "x86_64":
        assert has_vnni("flags\t: fpu avx2 avx512_vnni") and has_vnni("flags\t: avx2 avx_vnni")
        assert not has_vnni("flags\t: fpu sse avx2 fma")
