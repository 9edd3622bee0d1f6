"""GPTQ's rounding against round to nearest, on layers whose inputs have correlated features (as real ones do)."""
import numpy as np
import pytest

from qcompile.passes.analysis.assign_block_specs import block_spec
from qcompile.passes.analysis.round_blocks_gptq import gptq_levels


def _layer(k: int = 200, n: int = 24, rows: int = 1500, seed: int = 0):
    """Inputs X (rows, k) mixing a few strong directions, and a weight (k, n)."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * np.linspace(2.0, 0.1, k)[:, None]
    x = rng.standard_normal((rows, k)) @ mixing + rng.standard_normal(k)
    return x, rng.standard_normal((k, n)).astype(np.float32)


def _output_error(x: np.ndarray, weight: np.ndarray, restored: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (weight - restored)) / np.linalg.norm(x @ weight))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_leaves_less_output_error_than_round_to_nearest_on_other_samples(symmetric, act_order):
    """K = 200 is not a multiple of the block: the last block is short."""
    x, weight = _layer()
    held_out, _ = _layer(seed=0, rows=3000)
    rtn = block_spec(weight, 0, 32, symmetric)
    gptq = gptq_levels(weight, x.T @ x / len(x), rtn, act_order=act_order)
    assert gptq.method == "gptq" and gptq.levels.shape == weight.shape and gptq.levels.dtype == rtn.numpy_dtype
    lo, hi = rtn.grid.bounds
    assert lo <= gptq.levels.astype(int).min() and gptq.levels.astype(int).max() <= hi
    assert gptq.scale.shape == rtn.scale.shape and np.all(np.isfinite(gptq.scale)) and np.all(gptq.scale != 0)
    if act_order:  # the grids are round to nearest's; only the levels differ
        np.testing.assert_array_equal(gptq.scale, rtn.scale)
    rtn_error = _output_error(held_out, weight, rtn.dequantize(rtn.quantize(weight)))
    gptq_error = _output_error(held_out, weight, gptq.dequantize(gptq.quantize(weight)))
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_a_gemm_weight_stored_n_by_k_is_rounded_along_k():
    x, weight = _layer(k=96, n=16)
    rtn = block_spec(weight.T, 1, 32, True)
    gptq = gptq_levels(weight.T, x.T @ x / len(x), rtn)
    assert gptq.levels.shape == (16, 96) and gptq.scale.shape == (16, 3)
    assert _output_error(x, weight, gptq.dequantize(gptq.levels).T) < 0.8 * _output_error(
        x, weight, rtn.dequantize(rtn.quantize(weight.T)).T)


def test_dead_inputs_and_degenerate_blocks_give_finite_grids():
    """A feature never active on the data (zero Hessian row), an all-zero block, an outlier: no NaN, no zero scale."""
    x, weight = _layer(k=64, n=8)
    x[:, 5] = 0.0
    weight[:32, 3] = 0.0
    weight[40, 2] = 1e4
    gptq = gptq_levels(weight, x.T @ x / len(x), block_spec(weight, 0, 32, False))
    restored = gptq.dequantize(gptq.levels)
    assert np.all(np.isfinite(restored)) and np.all(gptq.scale != 0)
    np.testing.assert_array_equal(restored[:32, 3], 0.0)
    assert restored[40, 2] == pytest.approx(1e4, rel=0.07)


def test_a_singular_hessian_is_damped_until_it_factors():
    x, weight = _layer(k=64, n=8, rows=10)  # rank 10 of 64
    gptq = gptq_levels(weight, x.T @ x / len(x), block_spec(weight, 0, 32, True), damp=1e-9)
    assert np.all(np.isfinite(gptq.dequantize(gptq.levels)))


def test_hessian_stages_keep_graph_order_and_split_past_the_budget():
    import onnx_ir as ir

    from qcompile.passes.analysis.round_blocks_gptq import HESSIAN_BUDGET, hessian_stages

    xs = [ir.Value(name=f"x{i}") for i in range(5)]
    assert hessian_stages(dict.fromkeys(xs, 64), count=2) == [(0, xs[:3]), (1, xs[3:])]
    huge = int((HESSIAN_BUDGET / 8) ** 0.5 * 0.8)  # one Hessian fits the budget, two do not
    assert hessian_stages(dict.fromkeys(xs[:3], huge)) == [(0, [xs[0]]), (0, [xs[1]]), (0, [xs[2]])]
    assert hessian_stages(dict.fromkeys(xs[:4], huge), count=2) == [(0, [xs[0]]), (0, [xs[1]]), (1, [xs[2]]),
                                                                  (1, [xs[3]])]
