"""AWQ's scale search against round to nearest, measured on the layer's outputs, not its Hessian."""
import numpy as np

from qcompile.calibration import CalibrationData
from qcompile.passes.analysis.assign_block_specs import block_spec
from qcompile.passes.analysis.choose_awq_scales import AWQOptions, choose_scale

OPTIONS = AWQOptions(CalibrationData("random"), block_size=32)


def _inputs(rows: int, seed: int, loud: float) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 96))
    x[:, :6] *= loud  # a few channels far louder than the rest, as in LLMs
    return x


def _rounded(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What the layer computes with: rows scaled, rounded in blocks, and the scale taken back off the input."""
    spec = block_spec(weight * scale[:, None], 0, 32, True)
    return spec.dequantize(spec.quantize(weight * scale[:, None])) / scale[:, None]


def test_loud_channels_get_scaled_up_and_the_outputs_of_other_samples_lose_less():
    weight = np.random.default_rng(1).standard_normal((96, 40)).astype(np.float32)
    x = _inputs(800, seed=2, loud=30)
    alpha, scale = choose_scale([weight], [4], x.T @ x / len(x), np.abs(x).mean(axis=0), OPTIONS)
    assert 0 < alpha < 1 and scale[:6].min() > scale[6:].max()
    other = _inputs(800, seed=3, loud=30)
    error = {name: np.linalg.norm(other @ (weight - _rounded(weight, s)))
             for name, s in (("awq", scale), ("rtn", np.ones(96)))}
    assert error["awq"] < 0.8 * error["rtn"], error


def test_channels_of_one_size_need_no_scales_and_a_dead_input_none_either():
    weight = np.random.default_rng(1).standard_normal((96, 40)).astype(np.float32)
    x = _inputs(800, seed=2, loud=1)
    choice = choose_scale([weight], [4], x.T @ x / len(x), np.abs(x).mean(axis=0), OPTIONS)
    assert choice is None or np.all(np.abs(np.log(choice[1])) < 0.05)  # any alpha of channels alike is about 1
    assert choose_scale([weight], [4], np.zeros((96, 96)), np.zeros(96), OPTIONS) is None
