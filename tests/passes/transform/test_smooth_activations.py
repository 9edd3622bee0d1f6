import numpy as np
import onnx_ir as ir
import pytest
from helpers import apply, clone, op_types, parse, random_feed, run

import qcompile
from qcompile.calibration import CalibrationData
from qcompile.passes.analysis.choose_smoothing import (ALPHAS, ChooseSmoothingOptions, ChooseSmoothingPass,
                                                      choose_alpha)
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.models import minilm, synthetic
from qcompile.models.registry import build_cached
from qcompile.passes.canonicalize.infer_shapes import InferShapesPass
from qcompile.passes.transform.smooth_activations import SmoothActivationsPass
from qcompile.decisions import CHANNEL_SCALE_KEY, read_channel_scale


def _with_outliers() -> ir.Model:
    """The synthetic transformer block with a few LayerNorm channels 30x the others, as real ones have."""
    model = synthetic.transformer_block()
    for name in ("ln1.weight", "ln2.weight"):
        value = model.graph.initializers[name]
        gamma = value.const_value.numpy().copy()
        gamma[[3, 17]] = 30.0
        value.const_value = ir.tensor(gamma, name=name)
    return model


def _data(tmp_path, model, samples=16):
    feed = random_feed(model, batch=samples, seq=6, seed=1)
    np.savez(tmp_path / "calib.npz", **feed)
    return str(tmp_path / "calib.npz"), feed


def _smooth(model, data, alpha=0.8):
    return apply(model, ChooseSmoothingPass(ChooseSmoothingOptions(CalibrationData(data), alpha)),
                 SmoothActivationsPass())


def test_the_function_is_unchanged_and_the_scales_are_folded_where_free(tmp_path):
    model = _with_outliers()
    data, feed = _data(tmp_path, model)
    before = clone(model)
    assert _smooth(model, data)

    np.testing.assert_allclose(run(model, feed)[0], run(before, feed)[0], rtol=1e-4, atol=1e-4)
    # LayerNorm outputs feed only the projections: 1/s goes into gamma and beta. The attention
    # context's goes through its Reshape, Transpose and the probabilities @ V MatMul into V's
    # projection. Only the GELU output (a Mul of two tensors) gets a Mul.
    assert op_types(model).count("Mul") == op_types(before).count("Mul") + 1
    gamma = next(n for n in model.graph if n.name == "ln1").inputs[1].const_value.numpy()
    assert gamma[3] / gamma[0] < 30 / 2
    nodes = {n.name: n for n in model.graph}
    assert read_channel_scale(nodes["ln1"].outputs[0].metadata_props[CHANNEL_SCALE_KEY]).shape == (32,)
    # V's heads are rescaled per (head, dim): eval divides that back out.
    v_heads = read_channel_scale(nodes["v.transpose"].outputs[0].metadata_props[CHANNEL_SCALE_KEY])
    context = read_channel_scale(nodes["context.reshape"].outputs[0].metadata_props[CHANNEL_SCALE_KEY])
    assert v_heads.shape == (4, 1, 8) and context.shape == (32,)
    np.testing.assert_array_equal(v_heads.reshape(-1), context)
    before_v = next(n for n in before.graph if n.name == "v_proj").inputs[1].const_value.numpy()
    after_v = nodes["v_proj"].inputs[1].const_value.numpy()
    assert not np.allclose(after_v, before_v)
    # V's bias stays a vector: ONNX Runtime fuses the bias Add into the MatMul only then
    assert nodes["v_proj.bias_add"].inputs[1].const_value.shape == (32,)


def test_the_context_gets_a_mul_where_v_feeds_something_else(tmp_path):
    model = _with_outliers()
    v_heads = next(n for n in model.graph if n.name == "v.transpose").outputs[0]
    model.graph.outputs.append(v_heads)
    data, feed = _data(tmp_path, model)
    before = clone(model)
    assert _smooth(model, data)

    for got, want in zip(run(model, feed), run(before, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert op_types(model).count("Mul") == op_types(before).count("Mul") + 2


def _shared_v_head() -> ir.Model:
    """Grouped-query attention in small: one V head serves both query heads, broadcast in probs @ V."""
    rng = np.random.default_rng(0)
    wv, wo = (", ".join(f"{w:.3f}" for w in rng.standard_normal(n)) for n in (8 * 4, 8 * 3))
    return parse(f"""
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[N, 6, 8] x, float[N, 2, 6, 6] probs) => (float[N, 6, 3] y)
          <int64[4] one_head = {{0, 0, 1, 4}}, int64[3] merged = {{0, 0, 8}}, float[8, 4] wv = {{{wv}}},
           float[8, 3] wo = {{{wo}}}> {{
            v = MatMul(x, wv)
            v_head = Reshape(v, one_head)
            v_heads = Transpose<perm = [0, 2, 1, 3]>(v_head)
            context = MatMul(probs, v_heads)
            context_t = Transpose<perm = [0, 2, 1, 3]>(context)
            context_merged = Reshape(context_t, merged)
            y = MatMul(context_merged, wo)
        }}""")


def test_a_context_from_a_broadcast_v_head_gets_a_mul(tmp_path):
    model = _shared_v_head()
    apply(model, InferShapesPass())
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((4, 6, 8)).astype(np.float32) * np.float32([1, 1, 1, 1, 1, 1, 1, 20]),
            "probs": rng.dirichlet(np.ones(6), (4, 2, 6)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **feed)
    before = clone(model)
    assert _smooth(model, str(tmp_path / "calib.npz"))

    np.testing.assert_allclose(run(model, feed)[0], run(before, feed)[0], rtol=1e-4, atol=1e-4)
    assert op_types(model).count("Mul") == 2  # x's 1/s and the context's


SCALAR_AND_VECTOR_MULS = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 6, 4] x) => (float[N, 6, 3] y, float[N, 6, 3] z)
  <float half = {0.5}, float[4] gain = {1, 2, 3, 4},
   float[4, 3] w1 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[4, 3] w2 = {3, 1, 2, 1, 2, 3, 2, 3, 1, 1, 1, 1}> {
    a = Mul(x, half)
    y = MatMul(a, w1)
    b = Mul(x, gain)
    z = MatMul(b, w2)
}
"""


def test_1_over_s_goes_into_a_per_channel_mul_but_leaves_a_scalar_one_scalar(tmp_path):
    model = parse(SCALAR_AND_VECTOR_MULS)
    apply(model, InferShapesPass())
    x = np.random.default_rng(0).standard_normal((16, 6, 4)).astype(np.float32)
    x[..., 1] *= 30  # an outlier channel to smooth
    np.savez(tmp_path / "calib.npz", x=x)
    before = clone(model)
    assert _smooth(model, str(tmp_path / "calib.npz"))

    np.testing.assert_allclose(run(model, {"x": x})[0], run(before, {"x": x})[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(run(model, {"x": x})[1], run(before, {"x": x})[1], rtol=1e-4, atol=1e-3)
    muls = [n for n in model.graph if n.op_type == "Mul"]
    assert len(muls) == 3  # the one by gain took 1/s; the one by 0.5 (a GELU's, say) got a Mul beside it
    constants = [n.inputs[1].const_value.numpy() for n in muls]
    assert any(c.size == 1 and c == np.float32(0.5) for c in constants)
    gain = next(c for c, n in zip(constants, muls) if n.inputs[0].name == "x" and c.size == 4)
    assert not np.allclose(gain, [1, 2, 3, 4])


def test_w8a8_is_more_accurate_with_smoothquant(tmp_path):
    source = save_model(_with_outliers(), tmp_path / "in.onnx")
    data, feed = _data(tmp_path, _with_outliers(), samples=32)
    reference = run(_with_outliers(), feed)[0]

    def sqnr(smoothquant: str) -> float:
        options = {"smoothquant": smoothquant, "placement": "integer"}  # not the float placement
        y = run(qcompile.compile(source, recipe="w8a8", calib=data, options=options).model,
                feed)[0]
        return 10 * np.log10(np.sum(reference**2) / np.sum((reference - y) ** 2))

    assert sqnr("auto") > sqnr("off") + 3


def test_with_per_tensor_weights_smoothing_counts_the_rows_it_scales_up(tmp_path):
    # With one weight scale per tensor, the rows SmoothQuant scales up set that scale: an estimate
    # that assumed per-channel scales chose alpha 0.8-0.9 on MiniLM and zeroed 95% of some FFN weights.
    path = build_cached(minilm.ENTRY)
    np.savez(tmp_path / "calib.npz", **minilm.sentence_data("calibration", 16))
    evaluation = minilm.sentence_data("evaluation", 32)
    reference = qcompile.session(path).run(["sentence_embedding"], evaluation)[0]
    compiled = qcompile.compile(path, recipe="w8a8", calib=str(tmp_path / "calib.npz"),
                                options={"per_channel": False})
    embedding = run(compiled.model, evaluation)[1]
    cosine = np.sum(embedding * reference, 1) / np.linalg.norm(embedding, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.mean() > 0.95  # 0.77 with the per-channel estimate, 0.96 without smoothing


def test_per_sample_vectors_are_left_alone(tmp_path):
    model = synthetic.mlp()  # rank-2 activations: too few observations per channel to even them out
    data, _ = _data(tmp_path, model)
    assert not _smooth(model, data)


@pytest.mark.parametrize("value", ["0", "1.5", "strong"])
def test_a_bad_alpha_is_a_usage_error(tmp_path, value):
    source = save_model(synthetic.transformer_block(), tmp_path / "in.onnx")
    with pytest.raises(UsageError, match="option smoothquant"):
        qcompile.compile(source, recipe="w8a8", calib="random", options={"smoothquant": value})


def test_w8a8_dynamic_smooths_when_given_data(tmp_path):
    source = save_model(_with_outliers(), tmp_path / "in.onnx")
    data, feed = _data(tmp_path, _with_outliers(), samples=32)
    reference = run(_with_outliers(), feed)[0]

    def compiled(**kwargs):
        result = qcompile.compile(source, recipe="w8a8-dynamic", **kwargs)
        y = run(result.model, feed)[0]
        return 10 * np.log10(np.sum(reference**2) / np.sum((reference - y) ** 2)), " ".join(result.report["notes"])

    smoothed, notes = compiled(calib=data)
    plain, plain_notes = compiled()
    assert "SmoothQuant" in notes and "SmoothQuant" not in plain_notes
    assert smoothed > plain + 3


def test_balanced_channels_are_left_alone_by_auto_and_smoothed_when_always():
    rng = np.random.default_rng(0)
    x_max, x_energy, weight = np.ones(16), np.full(16, 1 / 3), rng.standard_normal((16, 8))
    assert choose_alpha(x_max, x_energy, [weight], None, True) is None
    assert choose_alpha(x_max, x_energy, [weight], None, True, always=True)[0] in ALPHAS


def test_w8a8_smoothquant_smooths_every_matmul_input(tmp_path):
    source = save_model(synthetic.transformer_block(), tmp_path / "in.onnx")
    data, feed = _data(tmp_path, synthetic.transformer_block(), samples=32)
    reference = run(synthetic.transformer_block(), feed)[0]
    result = qcompile.compile(source, recipe="w8a8-smoothquant", calib=data, options={"placement": "integer"})
    assert any(n.startswith("SmoothQuant: 4 of 4 MatMul inputs smoothed") for n in result.report["notes"])
    y = run(result.model, feed)[0]
    assert 10 * np.log10(np.sum(reference**2) / np.sum((reference - y) ** 2)) > 25
