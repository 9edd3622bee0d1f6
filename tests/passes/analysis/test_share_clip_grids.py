import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from helpers import clone, parse, random_feed

import qcompile
from qcompile.io import save_model
from qcompile.passes.analysis.share_clip_grids import ShareClipGridsPass


def _relu_beside_signed() -> ir.Model:
    """A Relu'd Conv output concatenated with a signed one: their shared grid reaches below zero."""
    rng = np.random.default_rng(0)
    w0, w1, w2 = (", ".join(f"{v:.3f}" for v in rng.normal(0, 0.4, n)) for n in (4 * 3 * 9, 4 * 3 * 9, 2 * 8 * 9))
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 2, 8, 8] y)
            <float[4, 3, 3, 3] w0 = {{{w0}}}, float[4, 3, 3, 3] w1 = {{{w1}}}, float[2, 8, 3, 3] w2 = {{{w2}}}> {{
            c0 = Conv<pads = [1, 1, 1, 1]>(x, w0)
            r0 = Relu(c0)
            c1 = Conv<pads = [1, 1, 1, 1]>(x, w1)
            cat = Concat<axis = 1>(r0, c1)
            y = Conv<pads = [1, 1, 1, 1]>(cat, w2)
        }}""")


def _run(model: ir.Model, feed: dict, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _compile(tmp_path) -> ir.Model:
    source, calib = tmp_path / "in.onnx", tmp_path / "calib.npz"
    save_model(_relu_beside_signed(), source)
    np.savez(calib, **random_feed(_relu_beside_signed(), batch=16, seed=1))
    return qcompile.compile(source, recipe="w8a8", calib=str(calib)).model


def test_the_relu_grid_goes_onto_the_conv_output_exactly_and_ort_runs_every_conv_on_integers(tmp_path):
    model = _compile(tmp_path)

    relu = next(node for node in model.graph if node.op_type == "Relu")
    conv_grid, relu_grid = relu.inputs[0].producer(), next(user for user, _ in relu.outputs[0].uses())
    assert (conv_grid.op_type, relu_grid.op_type) == ("DequantizeLinear", "QuantizeLinear")
    (scale, zero_point), relu_scale_zero_point = ([v.const_value.numpy() for v in node.inputs[1:]]
                                                  for node in (conv_grid, relu_grid))
    assert [scale, zero_point] == relu_scale_zero_point and zero_point > 0  # one grid, reaching below zero
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    save_model(model, tmp_path / "out.onnx")
    ort.InferenceSession(str(tmp_path / "out.onnx"), options, providers=["CPUExecutionProvider"])
    import onnx

    # both Convs whose outputs are quantized (the last one's is the model's output)
    assert [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node].count("QLinearConv") == 2

    # exact: the same model without the Conv output's Q/DQ computes the same numbers
    without = clone(model)
    relu = next(node for node in without.graph if node.op_type == "Relu")
    relu.replace_input_with(0, relu.inputs[0].producer().inputs[0].producer().inputs[0])
    feed = random_feed(model, batch=4, seed=5)
    np.testing.assert_array_equal(_run(model, feed, optimize=False), _run(without, feed, optimize=False))
    assert not ShareClipGridsPass()(model).modified
