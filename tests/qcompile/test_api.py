"""The Python API takes what README shows and turns any other argument into one UsageError."""
import numpy as np
import pytest

import qcompile
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.models import synthetic
from tests.helpers import parse


@pytest.fixture
def cnn(tmp_path):
    path = tmp_path / "cnn.onnx"
    save_model(synthetic.cnn(), path)
    return path


def test_a_lone_name_is_one_pattern_not_its_letters(cnn, tmp_path):
    result = qcompile.compile(cnn, recipe="w8a8", calib="random", exclude="block.*", dump_after="insert-qdq",
                              dump_dir=tmp_path, options={"smoothquant": 0.5})
    precisions = {layer["name"]: layer["precision"] for layer in result.report["layers"]}
    assert all(p.startswith("w:fp32") for name, p in precisions.items() if name.startswith("block."))
    assert any(not p.startswith("w:fp32") for name, p in precisions.items() if not name.startswith("block."))
    assert not any("matches no node" in note for note in result.report["notes"])
    assert (tmp_path / "cnn.after-insert-qdq.onnx").is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"input": None}, "input: expected a file path"),
    ({"options": ["per_channel=false"]}, "options: expected a dict"),
    ({"exclude": None}, "exclude: expected a name or a list of names"),
    ({"calib_size": "8"}, "calib_size: expected a whole number of at least 1"),
    ({"seed": -1}, "seed: expected a whole number of at least 0"),
])
def test_wrong_compile_arguments_are_usage_errors(cnn, kwargs, message):
    with pytest.raises(UsageError, match=message):
        qcompile.compile(**{"input": cnn, "recipe": "w8a8", "calib": "random", **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "limit: expected a whole number of at least 1"),
    ({"limit": "8"}, "limit: expected a whole number of at least 1"),
    ({"min_sqnr": "20"}, "min_sqnr: expected a finite number of dB"),
    ({"data": None}, "data: expected a file path"),
])
def test_wrong_verify_arguments_are_usage_errors(cnn, kwargs, message):
    result = qcompile.compile(cnn, recipe="w8a16")
    with pytest.raises(UsageError, match=message):
        result.verify(**{"data": "random", **kwargs})
    with pytest.raises(UsageError, match="save: expected a file path"):
        result.save(None)


def test_session_takes_one_provider_by_name(cnn):
    session = qcompile.session(cnn, providers="CPUExecutionProvider")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.run(None, {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)})[0].shape[0] == 1


def test_a_calib_size_beyond_the_data_is_noted_and_tensorrt_reports_no_cpu_option(cnn, tmp_path):
    np.savez(tmp_path / "calib.npz", pixel_values=np.zeros((4, 3, 32, 32), np.float32))
    result = qcompile.compile(cnn, recipe="w8a8", calib=str(tmp_path / "calib.npz"), calib_size=100,
                              target="tensorrt")
    assert any(n.startswith("--calib-size 100:") and "holds 4 samples" in n for n in result.report["notes"])
    assert "cpu" not in result.report["options"]
    result = qcompile.compile(cnn, recipe="w8a8", calib="random", calib_size=100)
    assert not any(n.startswith("--calib-size") for n in result.report["notes"])
    assert result.report["options"]["cpu"] == "any"


def test_moving_average_option_averages_the_batch_ranges_of_minmax(tmp_path):
    model = tmp_path / "matmul.onnx"
    save_model(parse("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 2] y) <float[4, 2] w = {1, -2, 3, 4, -5, 6, 7, 8}> { y = MatMul (x, w) }"""),
               model)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)
    x[:8, 0], x[8:, 0] = (-1, 1, 0, 0, 0, 0, 0, 0), (-3, 3, 0, 0, 0, 0, 0, 0)  # batches of 8: [-1, 1], [-3, 3]
    np.savez(tmp_path / "calib.npz", x=x)

    def input_scale(**options) -> float:
        compiled = qcompile.compile(model, recipe="w8a8", calib=tmp_path / "calib.npz", options=options).model
        quantize = next(n for n in compiled.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x")
        return float(quantize.inputs[1].const_value.numpy())

    assert input_scale() == pytest.approx(6 / 255, rel=1e-6)
    assert input_scale(moving_average=0.5) == pytest.approx(4 / 255, rel=1e-6)  # -1 + 0.5 (-3 + 1), 1 + 0.5 (3 - 1)


def _float16(model):
    """The model exported in float16: every float32 tensor, weight and graph input and output."""
    import onnx_ir as ir

    for value in (*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph for v in node.outputs)):
        if value.dtype == ir.DataType.FLOAT:
            value.dtype = ir.DataType.FLOAT16
    for value in model.graph.initializers.values():
        if value.dtype == ir.DataType.FLOAT:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float16), name=value.name)
            value.dtype = ir.DataType.FLOAT16
    return model


@pytest.mark.parametrize("recipe", ["w8a8", "w8a16"])
def test_a_float16_model_is_quantized_and_keeps_its_float16_interface(tmp_path, recipe):
    source = tmp_path / "fp16.onnx"
    save_model(_float16(synthetic.cnn()), source)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", pixel_values=rng.standard_normal((8, 3, 32, 32)).astype(np.float16))
    np.savez(tmp_path / "eval.npz", pixel_values=rng.standard_normal((8, 3, 32, 32)).astype(np.float16))

    result = qcompile.compile(source, recipe=recipe, calib=str(tmp_path / "calib.npz"))
    result.save(tmp_path / "out.onnx")
    verification = result.verify(str(tmp_path / "eval.npz"))

    assert [v.dtype.name for v in (*result.model.graph.inputs, *result.model.graph.outputs)] == ["FLOAT16"] * 2
    assert all(layer["precision"].startswith("w:int8") for layer in result.report["layers"])
    assert verification["outputs"][0]["sqnr_db"] > 25


def test_the_report_gives_the_compiles_own_peak_memory_not_the_process_s(cnn):
    from qcompile.memory import peak_bytes, reset_peak

    if not reset_peak():
        pytest.skip("this system cannot reset the peak resident memory")
    before = np.ones(300 << 20, np.uint8)  # 300 MB resident before the compile, then freed
    del before
    peak_before = peak_bytes()
    report = qcompile.compile(cnn, recipe="w8a8-dynamic").report
    assert 0 < report["peak_memory_bytes"] < peak_before - (150 << 20)
