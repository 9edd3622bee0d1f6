import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import apply, clone, parse, run
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import UsageError
from qcompile.graph import all_graphs
from qcompile.io import runtime_ir_version
from qcompile.layers import layer_precisions
from qcompile.calibration import CalibrationData
from qcompile.passes.analysis.choose_int8_storage import (MIN_WEIGHT_SQNR_DB, OUTPUT_SQNR_DB, ChooseInt8StorageOptions,
                                                          ChooseInt8StoragePass, _Probe)
from qcompile.passes.fusion.store_float16_weights import StoreFloat16WeightsPass
from qcompile.passes.fusion.store_int8_weights import StoreInt8WeightsPass
from qcompile.recipes import get_recipe
from qcompile.recipes.base import Settings
from qcompile.targets import get_target

D, H = 16, 8
rng = np.random.default_rng(0)
CONV_W = rng.standard_normal((D, D, 3, 3)).astype(np.float32) * 0.1
SHARED_W = rng.standard_normal((D, D)).astype(np.float32)
LSTM_W, LSTM_R = (rng.standard_normal((1, 4 * H, n)).astype(np.float32) for n in (D, H))
TABLE = rng.standard_normal((32, D)).astype(np.float32)
BODY_W = rng.standard_normal((D, D)).astype(np.float32) * 0.2
ADDED = rng.standard_normal((D, D)).astype(np.float32)  # read by a MatMul and an Add: not only a weight
WIDE = 512
SPIKY = np.full((WIDE, 4), 0.4999 / 127, np.float32)  # each column's peak sets a step under which the other
SPIKY[0] = 1.0  # 511 values all round to zero: 21 dB
SMALL = rng.standard_normal((4, 2)).astype(np.float32)


def _loop_body() -> onnx.GraphProto:
    nodes = [helper.make_node("MatMul", ["h_in", "body_w"], ["m"]), helper.make_node("Tanh", ["m"], ["h_out"]),
             helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    return helper.make_graph(
        nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, D])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, D])],
        [numpy_helper.from_array(BODY_W, "body_w")])


def _model() -> ir.Model:
    """A float Conv, a weight two MatMuls share, an LSTM, an embedding Gather, a Loop body's MatMul, and
    weights that must stay float: one an Add also reads, one INT8 holds badly, one too small to matter."""
    node = helper.make_node
    nodes = [
        node("Conv", ["image", "conv_w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        node("ReduceMean", ["conv"], ["pooled"], axes=[2, 3], keepdims=0),
        node("MatMul", ["pooled", "shared_w"], ["a"], name="first"),
        node("MatMul", ["a", "shared_w"], ["b"], name="second"),
        node("Unsqueeze", ["b", "zero"], ["seq"]),
        node("LSTM", ["seq", "lstm_w", "lstm_r"], ["", "lstm_h"], name="lstm", hidden_size=H),
        node("Gather", ["table", "ids"], ["embedded"], name="embed"),
        node("Loop", ["trips", "", "b"], ["looped"], name="loop", body=_loop_body()),
        node("MatMul", ["looped", "added"], ["c"], name="third"),
        node("Add", ["c", "added_row"], ["d"]),
        node("MatMul", ["wide", "spiky"], ["f"], name="spiky_matmul"),
        node("MatMul", ["f", "small"], ["e"], name="small_matmul"),
    ]
    added_row = node("Gather", ["added", "zero"], ["added_row"])
    graph = helper.make_graph(
        [*nodes[:-3], added_row, *nodes[-3:]], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, D, 5, 5]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]),
         helper.make_tensor_value_info("wide", TensorProto.FLOAT, [2, WIDE])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in (
            ("lstm_h", [1, 2, H]), ("embedded", [2, 3, D]), ("d", [2, D]), ("e", [2, 2]))],
        [numpy_helper.from_array(array, name) for name, array in (
            ("conv_w", CONV_W), ("shared_w", SHARED_W), ("lstm_w", LSTM_W), ("lstm_r", LSTM_R), ("table", TABLE),
            ("added", ADDED), ("spiky", SPIKY), ("small", SMALL), ("zero", np.array([0], np.int64)),
            ("trips", np.array(3, np.int64)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))


def _feed() -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(1).standard_normal((2, D, 5, 5)).astype(np.float32),
            "ids": np.array([[0, 5, 31], [7, 7, 2]], np.int64),
            "wide": np.random.default_rng(2).standard_normal((2, WIDE)).astype(np.float32)}


def _decoded(model: ir.Model) -> dict[str, np.ndarray]:
    """Each stored weight as the Cast and Mul decode it, by its original name."""
    weights = {}
    for graph in all_graphs(model):
        for node in graph:
            if node.op_type == "Mul" and node.inputs[0].producer() is not None \
                    and node.inputs[0].producer().op_type == "Cast":
                stored = node.inputs[0].producer().inputs[0]
                assert stored.dtype == ir.DataType.INT8
                weights[node.outputs[0].name] = stored.const_value.numpy() * node.inputs[1].const_value.numpy()
    return weights


def _with_weights(model: ir.Model, weights: dict[str, np.ndarray]) -> ir.Model:
    model = clone(model)
    for graph in all_graphs(model):
        for name, array in weights.items():
            if name in graph.initializers:
                graph.initializers[name].const_value = ir.tensor(array.astype(np.float32), name=name)
    return model


def test_weights_of_float_layers_are_stored_int8_and_decode_to_within_half_a_step():
    model = _model()
    reference = clone(model)

    assert apply(model, ChooseInt8StoragePass(), StoreInt8WeightsPass())

    weights = _decoded(model)
    assert set(weights) == {"conv_w", "shared_w", "lstm_w", "lstm_r", "table", "body_w"}
    originals = {"conv_w": (CONV_W, (1, 2, 3)), "shared_w": (SHARED_W, (0,)), "lstm_w": (LSTM_W, (2,)),
                 "lstm_r": (LSTM_R, (2,)), "table": (TABLE, (1,)), "body_w": (BODY_W, (0,))}
    for name, (original, reduced) in originals.items():  # one scale per output channel / gate row / table row
        step = np.max(np.abs(original), axis=reduced, keepdims=True) / 127
        assert np.all(np.abs(weights[name] - original) <= step / 2 * (1 + 1e-6)), name
    left = {value.name: value.dtype for value in model.graph.initializers.values()}
    assert left["added"] == left["spiky"] == left["small"] == ir.DataType.FLOAT
    assert any(f"under {MIN_WEIGHT_SQNR_DB:g} dB: spiky" in note for note in model.meta["qcompile.notes"])
    # The model computes exactly what the original does with the decoded weights.
    feed = _feed()
    for got, expected in zip(run(model, feed), run(_with_weights(reference, weights), feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not ChooseInt8StoragePass()(model).modified and not StoreInt8WeightsPass()(model).modified


def test_onnx_runtime_folds_the_decoding_when_it_loads_the_model_loop_bodies_included(tmp_path):
    model = _model()
    apply(model, ChooseInt8StoragePass(), StoreInt8WeightsPass())
    proto = ir.serde.serialize_model(model)
    proto.ir_version = runtime_ir_version(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    optimized = onnx.load(tmp_path / "optimized.onnx")
    loop = next(node for node in optimized.graph.node if node.op_type == "Loop")
    body = next(attr.g for attr in loop.attribute if attr.name == "body")
    assert not {"Cast", "Mul"} & {node.op_type for graph in (optimized.graph, body) for node in graph.node}


def test_the_report_reads_a_stored_weight_as_int8_and_says_why_its_layer_is_float():
    model = _model()
    apply(model, ChooseInt8StoragePass(), StoreInt8WeightsPass())

    rows = {row["name"]: row for row in layer_precisions(model)}
    assert rows["conv"]["precision"] == rows["lstm"]["precision"] == "w:int8 a:fp32"
    assert rows["third"]["precision"] == "w:fp32 a:fp32"
    assert "LSTM" in rows["lstm"]["why"]
    assert "subgraph" in next(row["why"] for row in rows.values() if row["op_type"] == "MatMul"
                              and row["name"] not in ("first", "second", "third", "spiky_matmul", "small_matmul"))


def test_a_weight_a_loop_carries_unchanged_into_its_body_is_stored_where_the_body_reads_it_as_one():
    """tf2onnx's Keras LSTM: the weights are Loop-carried values, cast to float and split by columns in the
    body, handed on as they are."""
    body = helper.make_graph(
        [helper.make_node("Cast", ["w_in"], ["w_float"], to=TensorProto.FLOAT),
         helper.make_node("Split", ["w_float"], ["w_left", "w_right"], axis=1),
         helper.make_node("MatMul", ["h_in", "w_left"], ["m_left"]),
         helper.make_node("MatMul", ["h_in", "w_right"], ["m_right"]),
         helper.make_node("Concat", ["m_left", "m_right"], ["m"], axis=1), helper.make_node("Tanh", ["m"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, D]),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [D, D])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, D]),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [D, D])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x", "carried_w"], ["h", "w_after"], body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, D])],
        [numpy_helper.from_array(BODY_W, "carried_w"), numpy_helper.from_array(np.array(3, np.int64), "trips")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    reference = clone(model)

    assert apply(model, ChooseInt8StoragePass(), StoreInt8WeightsPass())

    weights = _decoded(model)
    assert set(weights) == {"carried_w"}
    feed = {"x": np.random.default_rng(3).standard_normal((2, D)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feed)[0], run(_with_weights(reference, weights), feed)[0], rtol=1e-5,
                               atol=1e-6)


def test_layers_the_user_excluded_keep_float32_weights():
    model = _model()

    apply(model, ChooseInt8StoragePass(ChooseInt8StorageOptions(exclude=("conv", "second"))), StoreInt8WeightsPass())

    assert set(_decoded(model)) == {"lstm_w", "lstm_r", "table", "body_w"}


# `diff` cancels two nearly equal products: rounding either weight alone swamps it. `plain` does not.
CANCELLING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 32] x) => (float[N, 32] diff, float[N, 32] plain) <float[32, 32] w = {%s}, float[32, 32] v = {%s},
                                                              float[32, 32] u = {%s}> {
    a = MatMul(x, w)
    b = MatMul(x, v)
    diff = Sub(a, b)
    plain = MatMul(x, u)
}
"""


@pytest.mark.parametrize("apart, stored, said", [(1e-1, ir.DataType.FLOAT16, "2 as float16, 0 as float32"),
                                                (1e-3, ir.DataType.FLOAT, "as float32")])
def test_with_calibration_data_weights_whose_int8_rounding_the_outputs_cannot_bear_are_float16_or_float32(
        tmp_path, apart, stored, said):
    """w and v ``apart`` (noise of that size added): INT8 rounding swamps their difference; float16 rounding
    does at 1e-3. (v = w * (1 + apart) would not do: per-channel scales round both to the same integers.)"""
    w = rng.standard_normal((32, 32)).astype(np.float32)
    v = (w + apart * rng.standard_normal((32, 32))).astype(np.float32)
    u = rng.standard_normal((32, 32)).astype(np.float32)
    model = parse(CANCELLING % tuple(", ".join(map(str, a.ravel().tolist())) for a in (w, v, u)))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 32)).astype(np.float32))

    apply(model, ChooseInt8StoragePass(ChooseInt8StorageOptions(CalibrationData(str(tmp_path / "calib.npz")))),
          StoreInt8WeightsPass(), StoreFloat16WeightsPass())

    assert set(_decoded(model)) == {"u"}
    initializers = model.graph.initializers
    assert {initializers[f"{name}.float16"].dtype if f"{name}.float16" in initializers else initializers[name].dtype
            for name in ("w", "v")} == {stored}
    assert any(f"2 of 3 float weights of float layers stored {said}: INT8 would take the outputs "
               f"under {OUTPUT_SQNR_DB:g} dB" in note for note in model.meta["qcompile.notes"])
    # decided once: a second run measures nothing again
    again = ChooseInt8StoragePass(ChooseInt8StorageOptions(CalibrationData(str(tmp_path / "calib.npz"))))
    assert not again(model).modified


TWO_CANCELLING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 32] x) => (float[N, 32] close, float[N, 32] far, float[N, 32] plain)
    <float[32, 32] w = {%s}, float[32, 32] v = {%s}, float[32, 32] p = {%s}, float[32, 32] q = {%s},
     float[32, 32] u = {%s}> {
    a = MatMul(x, w)
    b = MatMul(x, v)
    close = Sub(a, b)
    c = MatMul(x, p)
    d = MatMul(x, q)
    far = Sub(c, d)
    plain = MatMul(x, u)
}
"""


def test_weights_the_outputs_bear_in_float16_only_in_part_are_float16_as_far_as_they_do(tmp_path):
    """w, v 1e-3 apart bear neither INT8 nor float16; p, q 1e-1 apart bear float16: found by bisection."""
    w, p, u = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(3))
    v = (w + 1e-3 * rng.standard_normal((32, 32))).astype(np.float32)
    q = (p + 1e-1 * rng.standard_normal((32, 32))).astype(np.float32)
    model = parse(TWO_CANCELLING % tuple(", ".join(map(str, a.ravel().tolist())) for a in (w, v, p, q, u)))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 32)).astype(np.float32))

    apply(model, ChooseInt8StoragePass(ChooseInt8StorageOptions(CalibrationData(str(tmp_path / "calib.npz")))),
          StoreInt8WeightsPass(), StoreFloat16WeightsPass())

    assert set(_decoded(model)) == {"u"}
    initializers = model.graph.initializers
    assert {"p.float16", "q.float16", "w", "v"} <= set(initializers) and initializers["w"].dtype == ir.DataType.FLOAT
    assert any("4 of 5 float weights of float layers stored 2 as float16, 2 as float32" in note
               for note in model.meta["qcompile.notes"])


def test_where_the_outputs_bear_every_weight_rounded_at_once_all_are_stored_measured_in_one_run(
        tmp_path, monkeypatch):
    w, v, u = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(3))  # nothing cancels
    model = parse(CANCELLING % tuple(", ".join(map(str, a.ravel().tolist())) for a in (w, v, u)))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 32)).astype(np.float32))
    replaced_per_run = []
    run = _Probe._run
    monkeypatch.setattr(_Probe, "_run",
                        lambda self, replaced: replaced_per_run.append(len(replaced)) or run(self, replaced))

    apply(model, ChooseInt8StoragePass(ChooseInt8StorageOptions(CalibrationData(str(tmp_path / "calib.npz")))),
          StoreInt8WeightsPass())

    assert set(_decoded(model)) == {"w", "v", "u"}
    assert replaced_per_run == [0, 3]  # the float weights, then all three rounded


def test_initializers_a_user_can_override_or_reads_as_outputs_stay_float32():
    weights = ", ".join(["0.5"] * 256)
    model = parse(f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x, float[16, 16] overridable) => (float[N, 16] y, float[16, 16] shown)
        <float[16, 16] overridable = {{{weights}}}, float[16, 16] shown = {{{weights}}}> {{
            a = MatMul(x, overridable)
            y = MatMul(a, shown)
        }}""")

    assert not apply(model, ChooseInt8StoragePass(), StoreInt8WeightsPass())


@pytest.mark.parametrize("target, option, stored", [("ort-cpu", "int8", True), ("ort-cpu", "float32", False),
                                                    ("tensorrt", "int8", False)])
def test_recipes_store_float_weights_as_asked_where_the_target_folds_them(target, option, stored):
    recipe = get_recipe("w8a16")
    settings = Settings(target=get_target(target), options=recipe.resolve_options({"float_weights": option}))

    assert ("store-int8-weights" in [p.name for p in recipe.build(settings)]) == stored


def test_placement_float_for_a_target_not_relied_on_to_fold_the_decoding_is_a_usage_error():
    recipe = get_recipe("w8a8")
    settings = Settings(target=get_target("tensorrt"), options=recipe.resolve_options({"placement": "float"}))
    with pytest.raises(UsageError, match="placement=float.*TensorRT.*placement=integer"):
        recipe.build(settings)


def test_an_unknown_float_weights_value_is_a_usage_error():
    recipe = get_recipe("w8a16")
    with pytest.raises(UsageError, match="float_weights.*int8, float32.*'fp16'"):
        recipe.build(Settings(options=recipe.resolve_options({"float_weights": "fp16"})))


def _optimized_op_types(path, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_placement_float_runs_the_fp32_graph_on_weights_stored_int8(tmp_path):
    import qcompile
    from qcompile.io import save_model
    from qcompile.models import synthetic

    source, output = tmp_path / "cnn.onnx", tmp_path / "float.onnx"
    save_model(synthetic.cnn(), source)
    result = qcompile.compile(source, recipe="w8a8", calib="random", options={"placement": "float"})
    result.save(output)

    precisions = {layer["precision"] for layer in result.report["layers"]}
    assert precisions == {"w:int8 a:fp32"}
    # What ONNX Runtime runs is the fp32 model's graph: the decoding is folded away when it loads.
    assert _optimized_op_types(output, tmp_path) == _optimized_op_types(source, tmp_path)
