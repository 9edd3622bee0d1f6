import numpy as np
import onnxruntime as ort
import pytest
from helpers import op_types, parse, random_feed, run

import qcompile
from qcompile.io import save_model
from qcompile.models import synthetic


def _sqnr(expected, actual):
    return 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))


def _calibration(tmp_path, model, samples=16, seed=1):
    feed = random_feed(model, batch=samples, seq=6, seed=seed)
    path = tmp_path / "calib.npz"
    np.savez(path, **feed)
    return str(path)


def _compile(tmp_path, build, **kwargs):
    source = tmp_path / "in.onnx"
    save_model(build(), source)
    result = qcompile.compile(source, recipe="w8a8", calib=_calibration(tmp_path, build()), **kwargs)
    out = result.save(tmp_path / "out.onnx")
    return result, out


def _ort_optimized_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    import onnx

    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_cnn_gets_qdq_int32_bias_and_ort_fuses_it_into_integer_convs(tmp_path):
    result, out = _compile(tmp_path, synthetic.cnn)
    model = result.model

    convs = [n for n in model.graph if n.op_type == "Conv"]
    for conv in convs:
        x, w, b = conv.inputs
        assert x.producer().op_type == "DequantizeLinear"
        assert x.producer().inputs[0].producer().op_type == "QuantizeLinear"
        assert b.producer().inputs[0].const_value.dtype.name == "INT32"
        # ort-cpu's default profile: symmetric INT8 with pair sums limited (exact on CPUs without VNNI too)
        weight_q, _, zero_point = (v.const_value.numpy() for v in w.producer().inputs)
        assert weight_q.dtype == np.int8 and np.all(zero_point == 0)
    assert result.report["cpu"]["weight_dtype"] == "int8" and result.report["cpu"]["pair_limit"] == 128
    fused = _ort_optimized_ops(out, tmp_path)
    assert fused.count("QLinearConv") == 3
    feed = random_feed(model, batch=4, seed=7)
    assert _sqnr(run(synthetic.cnn(), feed)[0], run(model, feed)[0]) > 20


def test_second_run_changes_nothing(tmp_path):
    result, out = _compile(tmp_path, synthetic.cnn)
    again = qcompile.compile(out, recipe="w8a8", calib=_calibration(tmp_path, synthetic.cnn()))
    assert op_types(again.model) == op_types(result.model)


def test_transformer_mask_path_stays_float_and_block_stays_accurate(tmp_path):
    result, _ = _compile(tmp_path, synthetic.transformer_block)
    model = result.model
    mask_add = next(n for n in model.graph if n.name == "scores.mask")
    assert [v.producer().op_type for v in mask_add.inputs] == ["Div", "Mul"]  # feeds Softmax: stays float
    layer_norms = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert all(n.inputs[0].producer() is None or n.inputs[0].producer().op_type != "DequantizeLinear"
               for n in layer_norms)
    matmul_inputs = [n.inputs[0].producer().op_type for n in model.graph if n.op_type == "MatMul"]
    assert matmul_inputs.count("DequantizeLinear") >= 6
    # fold-qdq: the head split (Reshape, Transpose) works on the quantized tensors, no requantization
    head_split = [n for n in model.graph
                  if n.op_type == "Reshape" and n.inputs[0].producer().op_type == "QuantizeLinear"]
    assert len(head_split) == 3
    feed = random_feed(model, batch=2, seq=6, seed=3)
    assert _sqnr(run(synthetic.transformer_block(), feed)[0], run(model, feed)[0]) > 20


def test_tensorrt_target_is_symmetric_int8_with_float_bias(tmp_path):
    result, _ = _compile(tmp_path, synthetic.cnn, target="tensorrt")
    quantizers = [n for n in result.model.graph if n.op_type == "QuantizeLinear"]
    assert quantizers
    for q in quantizers:
        zero_point = q.inputs[2].const_value.numpy()
        assert zero_point.dtype == np.int8 and np.all(zero_point == 0)
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    assert conv.inputs[2].const_value is not None  # float bias: TensorRT fuses it itself


def test_w8a8_without_calibration_data_is_a_usage_error(tmp_path):
    source = tmp_path / "in.onnx"
    save_model(synthetic.cnn(), source)
    with pytest.raises(qcompile.errors.UsageError, match="give --calib"):
        qcompile.compile(source, recipe="w8a8")


def _activation_grids(model):
    """Quantized activation -> (its producer's op type, scale, the grid's top value)."""
    grids = {}
    for node in model.graph:
        if node.op_type == "QuantizeLinear" and node.inputs[0].const_value is None:
            scale, zero = (v.const_value.numpy() for v in node.inputs[1:3])
            top = (np.iinfo(zero.dtype).max - int(zero)) * float(scale)
            producer = node.inputs[0].producer()
            grids[node.inputs[0].name] = (producer.op_type if producer else None, float(scale), top)
    return grids


def test_headroom_widens_8bit_activation_ranges_up_to_what_their_producers_emit(tmp_path):
    plain, _ = _compile(tmp_path, synthetic.cnn, options={"placement": "integer"})
    wide, _ = _compile(tmp_path, synthetic.cnn, options={"placement": "integer", "headroom": 1.5})
    plain_grids, wide_grids = _activation_grids(plain.model), _activation_grids(wide.model)
    assert plain_grids.keys() == wide_grids.keys()
    clipped = {name for name, (op, _, _) in plain_grids.items() if op == "Clip"}  # ReLU6: never past 6
    assert clipped and len(clipped) < len(plain_grids)
    for name, (_, scale, top) in wide_grids.items():
        if name in clipped:
            assert 6 <= top <= 6 + scale
        else:
            assert scale == pytest.approx(1.5 * plain_grids[name][1], rel=1e-5)
    for bad in (0.9, float("inf"), float("nan")):
        with pytest.raises(qcompile.errors.UsageError, match="headroom"):
            _compile(tmp_path, synthetic.cnn, options={"headroom": bad})


def test_vnni_profile_uses_signed_weights(tmp_path):
    result, _ = _compile(tmp_path, synthetic.cnn, options={"cpu": "vnni"})
    weights = [n.inputs[0].const_value.numpy() for n in result.model.graph
               if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.numpy().dtype == np.int8]
    assert max(np.abs(w).max() for w in weights) == 127


HUGE_ACTIVATION = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 4] x) => (float[N, 2] y) <float[4] big = {1e30, 1, 1, 1}, float[4, 2] w = {1, 2, 3, 4, 5, 6, 7, 8}> {
    h = Mul(x, big)
    y = MatMul(h, w)
}
"""


def test_activation_with_an_absurd_range_stays_float_with_a_note(tmp_path):
    source = tmp_path / "in.onnx"
    save_model(parse(HUGE_ACTIVATION), source)
    np.savez(tmp_path / "calib.npz", x=np.ones((4, 4), np.float32))
    result = qcompile.compile(source, recipe="w8a8", calib=str(tmp_path / "calib.npz"))
    assert any("h: range [1, 1e+30] is too wide for 8 bits; left float" in note for note in result.report["notes"])
    assert "QuantizeLinear" not in op_types(result.model)


def _conv_activations() -> "ir.Model":
    """Convs followed by activations that no integer Conv absorbs, and a head: Conv -> Sigmoid -> output."""
    rng = np.random.default_rng(0)
    weights = [", ".join(f"{v:.3f}" for v in rng.normal(0, 0.3, 4 * 4 * 9)) for _ in range(4)]
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y)
            <float[4, 4, 3, 3] w0 = {{{weights[0]}}}, float[4, 4, 3, 3] w1 = {{{weights[1]}}},
             float[4, 4, 3, 3] w2 = {{{weights[2]}}}, float[4, 4, 3, 3] w3 = {{{weights[3]}}}> {{
            c0 = Conv<pads = [1, 1, 1, 1]>(x, w0)
            a0 = LeakyRelu<alpha = 0.1>(c0)
            c1 = Conv<pads = [1, 1, 1, 1]>(a0, w1)
            s1 = Sigmoid(c1)
            a1 = Mul(c1, s1)
            c2 = Conv<pads = [1, 1, 1, 1]>(a1, w2)
            a2 = HardSwish(c2)
            c3 = Conv<pads = [1, 1, 1, 1]>(a2, w3)
            y = Sigmoid(c3)
        }}""")


def test_convs_before_other_activations_get_quantized_outputs_so_ort_runs_them_on_integers(tmp_path):
    result, out = _compile(tmp_path, _conv_activations)

    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    readers = [[user.op_type for user, _ in conv.outputs[0].uses()] for conv in convs[:3]]
    assert readers == [["QuantizeLinear"]] * 3
    assert [user.op_type for user, _ in convs[3].outputs[0].uses()] == ["Sigmoid"]  # the head stays float
    assert _ort_optimized_ops(out, tmp_path).count("QLinearConv") == 3
    feed = random_feed(result.model, batch=4, seed=7)
    assert _sqnr(run(_conv_activations(), feed)[0], run(result.model, feed)[0]) > 25


ROPE_ANGLES = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, S, 4] x) => (float[N, S, 4] y)
    <float[4, 4] w = {0.5, -0.2, 0.1, 0.3, 0.2, 0.4, -0.3, 0.1, -0.1, 0.2, 0.6, -0.4, 0.3, -0.5, 0.2, 0.7},
     float[1, 4, 1] inv_freq = {1.0, 0.3, 0.1, 0.03}, int64 zero = {0}, int64 one = {1}, int64[2] axes = {0, 1}> {
    shape = Shape(x)
    seq = Gather<axis = 0>(shape, one)
    steps = Range(zero, seq, one)
    positions = Cast<to = 1>(steps)
    row = Unsqueeze(positions, axes)
    angles = MatMul(inv_freq, row)
    turned = Transpose<perm = [0, 2, 1]>(angles)
    waves = Cos(turned)
    h = MatMul(x, w)
    y = Add(h, waves)
}
"""


def test_positions_computed_from_shapes_stay_float_beyond_the_calibrated_length(tmp_path):
    source, calib = tmp_path / "in.onnx", tmp_path / "calib.npz"
    save_model(parse(ROPE_ANGLES), source)
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 6, 4)).astype(np.float32))  # 6 positions
    model = qcompile.compile(source, recipe="w8a8", calib=str(calib)).model

    angles = next(node for node in model.graph if node.op_type == "MatMul" and node.inputs[0].const_value is not None)
    assert angles.inputs[1].producer().op_type == "Unsqueeze"  # the positions reach it unquantized
    feed = {"x": np.random.default_rng(1).standard_normal((2, 64, 4)).astype(np.float32)}  # 64 positions
    assert _sqnr(run(parse(ROPE_ANGLES), feed)[0], run(model, feed)[0]) > 20  # 1.8 dB with quantized positions


def _conv_hardswish_head(hardswish: str = "h1 = HardSwish(c1)", outputs: str = "float[N, 3] y") -> "ir.Model":
    """Conv -> Relu -> Conv -> HardSwish -> learnable scale -> Conv -> Relu -> pooled Gemm head."""
    rng = np.random.default_rng(1)
    w = [", ".join(f"{v:.3f}" for v in rng.normal(0, 0.3, 4 * 4 * 9)) for _ in range(3)]
    fc = ", ".join(f"{v:.3f}" for v in rng.normal(0, 0.5, 4 * 3))
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 8, 8] x) => ({outputs})
            <float[4, 4, 3, 3] w0 = {{{w[0]}}}, float[4, 4, 3, 3] w1 = {{{w[1]}}}, float[4, 4, 3, 3] w2 = {{{w[2]}}},
             float[1] scale = {{1.5}}, float[4, 3] fc = {{{fc}}}> {{
            c0 = Conv<pads = [1, 1, 1, 1]>(x, w0)
            r0 = Relu(c0)
            c1 = Conv<pads = [1, 1, 1, 1]>(r0, w1)
            {hardswish}
            s1 = Mul(h1, scale)
            c2 = Conv<pads = [1, 1, 1, 1]>(s1, w2)
            r2 = Relu(c2)
            pooled = GlobalAveragePool(r2)
            flat = Flatten(pooled)
            y = MatMul(flat, fc)
        }}""")


def test_a_conv_whose_output_reaches_a_quantized_input_through_float_ops_gets_an_integer_output(tmp_path):
    result, out = _compile(tmp_path, _conv_hardswish_head, options={"placement": "integer"})

    c0, c1, c2 = (n for n in result.model.graph if n.op_type == "Conv")
    assert [user.op_type for user, _ in c1.outputs[0].uses()] == ["QuantizeLinear"]  # HardSwish and Mul float
    assert _ort_optimized_ops(out, tmp_path).count("QLinearConv") == 3
    assert all(layer["precision"].startswith("w:int8") for layer in result.report["layers"])


def test_float_islands_leave_convs_with_float_readers_float_and_say_why(tmp_path):
    result, out = _compile(tmp_path, _conv_hardswish_head, options={"placement": "float-islands"})

    layers = {layer["name"]: layer for layer in result.report["layers"]}
    floats = [layer for layer in layers.values() if layer["precision"].endswith("a:fp32")]
    # c1 feeds HardSwish; c0 then feeds only a float Conv through Relu: both float. c2 -> Relu -> pool -> MatMul
    # keeps its integer output.
    assert len(floats) == 2 and all("float_islands" in layer["why"] for layer in floats)
    assert _ort_optimized_ops(out, tmp_path).count("QLinearConv") == 1
    feed = random_feed(result.model, batch=4, seed=2)
    assert _sqnr(run(_conv_hardswish_head(), feed)[0], run(result.model, feed)[0]) > 25


def test_an_excluded_conv_is_reported_float_and_why(tmp_path):
    def named():
        model = _conv_hardswish_head()
        for i, node in enumerate(model.graph):
            node.name = f"{node.op_type.lower()}{i}"
        return model

    result, _ = _compile(tmp_path, named, exclude=("conv2",), options={"placement": "integer"})

    layers = {layer["name"]: layer for layer in result.report["layers"]}
    assert layers["conv2"]["precision"] == "w:fp32 a:fp32" and "--exclude" in layers["conv2"]["why"]
    assert layers["conv0"]["precision"].startswith("w:int8") and layers["conv0"]["why"] is None



@pytest.mark.parametrize("hardswish", ["h1 = HardSwish(c1)",  # and as paddle2onnx writes it out:
                                       "g1 = HardSigmoid<alpha = 0.16666667, beta = 0.5>(c1)\n h1 = Mul(g1, c1)"])
def test_a_conv_output_read_only_by_a_hardswish_gets_a_grid_from_minus_3_up(tmp_path, hardswish):
    def build():
        return _conv_hardswish_head(hardswish)

    result, _ = _compile(tmp_path, build, options={"placement": "integer"})

    calibration = dict(np.load(_calibration(tmp_path, build())))
    c1_values = run(_conv_hardswish_head(hardswish, outputs="float[N, 3] y, float[N, 4, 8, 8] c1"), calibration)[1]
    assert c1_values.min() < -6  # what a grid over the calibrated range would have spent steps on
    quantize = next(n for n in result.model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "c1")
    scale, zero = (v.const_value.numpy() for v in quantize.inputs[1:3])
    assert -3 - 2 * float(scale) <= (np.iinfo(zero.dtype).min - int(zero)) * float(scale) <= -3  # and reaches -3
    feed = random_feed(result.model, batch=4, seed=2)
    assert _sqnr(run(build(), feed)[0], run(result.model, feed)[0]) > 25
