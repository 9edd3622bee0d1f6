"""What one activation rounding alone costs the outputs, measured on the float model."""
import numpy as np
from helpers import parse

from qcompile.io import save_model
from qcompile.sensitivity import (Rounding, activation_roundings, canonical_model, readers_to_leave_float,
                                  rounding_errors)

FLOAT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y) <float[8] w = {1, -2, 3, -4, 5, -6, 7, -8}> {
    a = Relu(x)
    y = Mul(a, w)
}
"""
# As a compiler would leave it: a rounded on a coarse grid, smoothed by f first where asked
COMPILED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y) <float[8] w = {1, -2, 3, -4, 5, -6, 7, -8}, float s = {0.25}, uint8 zp = {0},
                                     float[8] f = {1, 2, 1, 2, 1, 2, 1, 2}> {
    a = Relu(x)
    m = Mul(a, f)
    q = QuantizeLinear(%s, s, zp)
    d = DequantizeLinear(q, s, zp)
    y = Mul(d, w)
}
"""
rng = np.random.default_rng(0)


def _rounded(a, factor):
    return np.clip(np.rint(a * factor / 0.25), 0, 255) * 0.25 / factor


def test_each_rounding_alone_costs_the_outputs_what_numpy_computes_smoothing_factor_included(tmp_path):
    save_model(parse(FLOAT), tmp_path / "float.onnx")
    x = rng.standard_normal((4, 8)).astype(np.float32)
    a, w = np.maximum(x, 0), np.array([1, -2, 3, -4, 5, -6, 7, -8], np.float32)
    for quantized, factor in (("a", np.ones(8)), ("m", np.array([1, 2] * 4))):
        compiled = parse(COMPILED % quantized)
        compiled.graph.node(4).name = "scale"  # the Mul reading the rounded tensor
        canonical = canonical_model(tmp_path / "float.onnx")
        names = {v.name for v in canonical.graph.inputs} | {v.name for node in canonical.graph for v in node.outputs}

        (rounding,) = activation_roundings(compiled, names)
        (error,) = rounding_errors(canonical, [rounding], {"x": x}, tmp_path)

        assert rounding.tensor == "a" and rounding.readers == ("scale",)
        expected = np.sum(((_rounded(a, factor) - a) * w) ** 2) / np.sum((a * w) ** 2)
        assert error > 0 and np.isclose(error, expected, rtol=1e-4)


def _rounding(tensor, *readers):
    return Rounding(tensor, np.float32(1), np.uint8(0), None, readers)


def test_the_readers_left_float_take_a_chain_of_roundings_on_one_grid_with_them_counted_once():
    chain, other, small = _rounding("t", "conv"), _rounding("t_transposed", "conv"), _rounding("u", "matmul")

    assert readers_to_leave_float([chain, other, small], [0.01, 0.01, 0.001], budget=0.005) == ["conv"]
    assert readers_to_leave_float([chain, other, small], [0.01, 0.01, 0.001], budget=0.0005) == ["conv", "matmul"]
    assert readers_to_leave_float([chain, other, small], [0.01, 0.01, 0.001], budget=0.1) == []
