import hashlib
import json
import os

import numpy as np
import pytest

from qcompile.cli import _remedy, main
from qcompile.errors import UsageError
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile.verify import LATENCY_ROUNDS, blame
from tests.helpers import parse


@pytest.fixture
def cnn_file(tmp_path):
    path = tmp_path / "cnn.onnx"
    save_model(synthetic.cnn(), path)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_compile_writes_model_and_report_and_verifies(cnn_file, tmp_path, capsys):
    digest = _digest(cnn_file)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"

    code = main(["compile", str(cnn_file), "-o", str(out), "--verify", "--report", str(report_path), "--quiet"])

    assert code == 0
    assert _digest(cnn_file) == digest
    report = json.loads(report_path.read_text())
    assert report["recipe"] == "w8a16" and report["target"] == "ort-cpu"
    assert [p["name"] for p in report["passes"]][:4] == ["upgrade-opset", "lift-constant-nodes", "upcast-float16",
                                                        "fix-names"]
    assert 0 < report["size_bytes"]["after"] < report["size_bytes"]["before"]
    assert {layer["precision"] for layer in report["layers"]} == {"w:int8 a:fp32"}
    (logits,) = report["verification"]["outputs"]
    assert logits["sqnr_db"] > 30 and logits["cosine"] > 0.999
    assert set(report["versions"]) >= {"qcompile", "onnx", "onnxruntime"}


def test_verify_below_min_sqnr_exits_1_and_names_the_output(cnn_file, tmp_path, capsys):
    code = main(["compile", str(cnn_file), "-o", str(tmp_path / "o.onnx"), "--verify", "--min-sqnr", "200", "--quiet"])
    assert code == 1
    assert "'logits'" in _error_line(capsys)


def test_diff_names_the_pass_behind_each_change(cnn_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["compile", str(cnn_file), "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()

    assert main(["diff", str(cnn_file), str(out), "--json"]) == 0

    result = json.loads(capsys.readouterr().out)
    assert {r["op_type"] for r in result["removed"]} == {"BatchNormalization"}
    assert {(r["op_type"], r["created_by"]) for r in result["added"]} == {("DequantizeLinear", "quantize-weights")}
    changed = {r["name"]: r["changed_by"] for r in result["changed"]}
    assert changed["stem"] == "fold-batch-norm,quantize-weights"
    # a node a pass rebuilt under its old name, then changed again, is counted once for that pass
    assert main(["compile", str(cnn_file), "-o", str(out), "--recipe", "w8a8", "--calib", "random", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["diff", str(cnn_file), str(out), "--json"]) == 0
    passes = [r["changed_by"].split(",") for r in json.loads(capsys.readouterr().out)["changed"]]
    assert passes and all(len(set(p)) == len(p) for p in passes)


def test_inspect_reports_ops_sizes_and_precisions(cnn_file, capsys):
    assert main(["inspect", str(cnn_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opsets"] == {"ai.onnx": 18}
    assert info["inputs"] == {"pixel_values": "float[batch, 3, 32, 32]"}
    assert info["op_histogram"]["BatchNormalization"] == 3
    assert info["initializer_bytes"]["float"] == sum(
        v.const_value.nbytes for v in synthetic.cnn().graph.initializers.values())
    assert len(info["layers"]) == 4


def test_dump_after_writes_the_intermediate_model(cnn_file, tmp_path):
    assert main(["compile", str(cnn_file), "-o", str(tmp_path / "o.onnx"), "--dump-after", "fold-batch-norm",
                 "--dump-after", "infer-shapes", "--quiet"]) == 0
    assert (tmp_path / "cnn.after-fold-batch-norm.onnx").is_file()
    # infer-shapes runs twice in canonicalization: both dumps are kept
    assert (tmp_path / "cnn.after-infer-shapes.onnx").is_file() and (tmp_path / "cnn.after-infer-shapes-2.onnx").is_file()


@pytest.mark.parametrize("args, message", [
    (["compile", "{missing}", "-o", "{out}"], "no such file"),
    (["compile", "{garbage}", "-o", "{out}"], "not an ONNX model"),
    (["compile", "{cnn}", "-o", "{out}", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["compile", "{cnn}", "-o", "{out}", "--recipe", "auto"], "planned but not built yet"),
    (["compile", "{cnn}", "-o", "{out}", "--option", "alpha=0.5"], "has no option 'alpha'"),
    (["compile", "{cnn}", "-o", "{out}", "--option", "per_channel=maybe"], "expected true or false"),
    (["compile", "{cnn}", "-o", "{tmp}/no/such/dir/o.onnx"], "does not exist"),
    (["compile", "{cnn}", "-o", "{cnn}"], "never overwrites its input"),
    (["compile", "{cnn}", "-o", "{out}", "--dump-after", "no-such-pass"], "has no such pass"),
    (["compile", "{cnn}", "-o", "{out}", "--target", "fpga"], "unknown target"),
    (["compile", "{cnn}", "-o", "{out}", "--verify", "--verify-data", "{wrong_shape}"],
     "input 'pixel_values' has shape \\(4, 3, 16, 16\\), the model expects \\(N, 3, 32, 32\\)"),
    (["compile", "{cnn}", "-o", "{out}", "--verify", "--verify-data", "{wrong_name}"], "no array for model input"),
    (["compile", "{cnn}", "-o", "{out}", "--verify", "--verify-data", "{nan}"], "'pixel_values' has NaN or Inf"),
    (["compile", "{cnn}", "-o", "{out}", "--verify-data", "{nan}"], "--verify-data needs --verify"),
    (["compile", "{cnn}", "-o", "{out}", "--recipe", "w8a8", "--calib", "random", "--option", "calib_method=foo"],
     "option calib_method: expected one of minmax, percentile, entropy, mse"),
    (["compile", "{cnn}", "-o", "{out}", "--recipe", "w8a8", "--calib", "random", "--option", "moving_average=2"],
     "option moving_average: expected off or a number in \\(0, 1\\], got '2'"),
    (["compile", "{cnn}", "-o", "{out}", "--recipe", "w8a8", "--calib", "random", "--option", "moving_average=0.1",
      "--option", "calib_method=mse"], "option moving_average: .* needs calib_method=minmax, not mse"),
    (["compile", "{cnn}", "-o", "{out}", "--calib", "{empty}"], "holds no samples"),
    (["compile", "{bf16}", "-o", "{out}"], "unnamed MatMul computes in bfloat16; qcompile quantizes float32 and "
                                           "float16 models"),
    (["compile", "{cnn}", "-o", "{out}", "--seed", "-1"], "argument --seed: expected 0 or more, got -1"),
    (["compile", "{cnn}", "-o", "{out}", "--verify", "--verify-size", "0"], "--verify-size: expected 1 or more"),
    (["compile", "{cnn}", "-o", "{out}", "--verify", "--min-sqnr", "nan"], "--min-sqnr: expected a finite number"),
    (["eval", "{cnn}", "{cnn}", "--data", "random", "--layers", "-1"], "--layers: expected 1 or more"),
    (["inspect", "{garbage}"], "not an ONNX model"),
    (["diff", "{cnn}", "{missing}"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(cnn_file, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a model")
    np.savez(tmp_path / "wrong_shape.npz", pixel_values=np.zeros((4, 3, 16, 16), np.float32))
    np.savez(tmp_path / "wrong_name.npz", image=np.zeros((4, 3, 32, 32), np.float32))
    np.savez(tmp_path / "nan.npz", pixel_values=np.full((4, 3, 32, 32), np.nan, np.float32))
    np.savez(tmp_path / "empty.npz", pixel_values=np.zeros((0, 3, 32, 32), np.float32))
    bf16 = tmp_path / "bf16.onnx"
    save_model(parse("""<ir_version: 10, opset_import: ["" : 17]>
        g (bfloat16[N, 4] x) => (bfloat16[N, 2] y) <bfloat16[4, 2] w = {1, 2, 3, 4, 5, 6, 7, 8}> { y = MatMul (x, w) }"""),
               bf16)
    paths = {"missing": tmp_path / "missing.onnx", "garbage": garbage, "cnn": cnn_file, "out": tmp_path / "o.onnx",
             "tmp": tmp_path, "wrong_shape": tmp_path / "wrong_shape.npz", "wrong_name": tmp_path / "wrong_name.npz",
             "nan": tmp_path / "nan.npz", "empty": tmp_path / "empty.npz", "bf16": bf16}
    digest = _digest(cnn_file)

    try:
        code = main([a.format(**paths) for a in args])
    except SystemExit as exc:  # argparse's errors
        code = exc.code

    assert code == 2
    line = _error_line(capsys)
    assert line.startswith(("qcompile: error: ", f"qcompile {args[0]}: error: "))
    assert __import__("re").search(message, line), line
    assert _digest(cnn_file) == digest
    assert not (tmp_path / "o.onnx").exists()  # nothing left behind, even where only verification failed


def test_recipes_and_passes_list(capsys):
    assert main(["recipes"]) == 0
    assert "w8a16" in capsys.readouterr().out
    assert main(["passes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("fold-batch-norm", "choose-smoothing", "smooth-activations",
                                           "measure-bias-shift", "correct-bias"))


def test_recipes_name_prints_its_pass_list_and_typed_options(capsys):
    assert main(["recipes", "w8a8"]) == 0
    shown = capsys.readouterr().out
    assert "W8A8Options" in shown and "calib_method" in shown and "minmax" in shown
    # the passes in order, with their options
    order = ["upgrade-opset", "choose-equalization", "equalize-depthwise-inputs", "choose-smoothing",
             "select-quantized-ops", "calibrate-activations", "assign-weight-specs", "measure-bias-shift",
             "correct-bias", "quantize-weights", "insert-qdq", "fold-qdq"]
    positions = [shown.index(name) for name in order]
    assert positions == sorted(positions)
    assert main(["recipes", "auto"]) == 2
    assert "planned but not built yet" in _error_line(capsys)


def test_eval_lists_per_layer_error_worst_first_and_failed_verify_names_a_layer(cnn_file, tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, pixel_values=np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert main(["compile", str(cnn_file), "-o", str(out), "--recipe", "w8a8", "--calib", str(calib), "--quiet"]) == 0
    capsys.readouterr()

    assert main(["eval", str(cnn_file), str(out), "--data", str(calib), "--json"]) == 0

    result = json.loads(capsys.readouterr().out)
    layers = result["layers"]
    assert {row["op_type"] for row in layers} >= {"Clip", "Add"}
    assert [row["sqnr_db"] for row in layers] == sorted(row["sqnr_db"] for row in layers)
    assert all(0 < row["cosine"] <= 1 + 1e-9 and row["sqnr_db"] > 10 for row in layers)
    # where a tensor's quantization is decided: the nodes that read it, not its producer
    readers = {row["layer"]: row["readers"] for row in layers}
    assert readers["block.depthwise.relu6"] == ["block.pointwise"]
    assert sorted(readers["stem.relu6"]) == ["block.depthwise", "block.residual"]
    # the calibration data itself lies within the grids calibrated on it
    assert all(row["beyond_grid"] == 0 and row["peak_over_grid"] <= 1 for row in layers)

    code = main(["compile", str(cnn_file), "-o", str(out), "--recipe", "w8a8", "--calib", str(calib), "--verify",
                 "--min-sqnr", "90", "--quiet"])
    assert code == 1
    line = _error_line(capsys)
    assert "the layer adding the most error is" in line and "try --exclude '" in line


def test_eval_shows_how_much_of_the_data_overflows_the_calibrated_grids(cnn_file, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", pixel_values=x)
    np.savez(tmp_path / "wider.npz", pixel_values=4 * x)
    out = tmp_path / "out.onnx"
    assert main(["compile", str(cnn_file), "-o", str(out), "--recipe", "w8a8", "--calib", str(tmp_path / "calib.npz"),
                 "--quiet"]) == 0
    capsys.readouterr()

    assert main(["eval", str(cnn_file), str(out), "--data", str(tmp_path / "wider.npz"), "--json"]) == 0

    layers = json.loads(capsys.readouterr().out)["layers"]
    overflowing = [row for row in layers if row["beyond_grid"] > 0]
    assert overflowing and max(row["peak_over_grid"] for row in overflowing) > 1.5
    worst = max(overflowing, key=lambda row: row["beyond_grid"])
    assert "calibrate on data like these inputs" in _remedy(worst)
    assert "calibrate" not in _remedy({**worst, "beyond_grid": 0.0})

    # activations quantized at run time have no fixed grid to overflow
    assert main(["compile", str(cnn_file), "-o", str(out), "--recipe", "w8a8-dynamic", "--quiet"]) == 0
    assert main(["eval", str(cnn_file), str(out), "--data", str(tmp_path / "wider.npz"), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert layers and all(row["beyond_grid"] is None for row in layers)


def test_tensorrt_models_are_checked_with_onnx_qdq_semantics_not_cpu_integer_kernels(cnn_file, tmp_path, capsys):
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", pixel_values=x)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["compile", str(cnn_file), "-o", str(out), "--recipe", "w8a8", "--target", "tensorrt", "--calib",
                 str(tmp_path / "calib.npz"), "--verify", "--report", str(report_path), "--quiet"]) == 0
    assert main(["eval", str(cnn_file), str(out), "--data", str(tmp_path / "calib.npz"), "--target", "tensorrt",
                 "--json"]) == 0

    # TensorRT adds INT8 products in 32 bits: the Q/DQ graph as ONNX defines it, run op by op
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(str(cnn_file), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    actual = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x})[0]
    sqnr = 10 * np.log10(np.sum(expected**2) / np.sum((expected - actual) ** 2))
    verification = json.loads(report_path.read_text())["verification"]
    evaluation = json.loads(capsys.readouterr().out)
    for result in (verification, evaluation):
        assert result["outputs"][0]["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
        assert "latency_ms" not in result and "as tensorrt does" in result["runtime"]


def test_eval_of_a_model_against_itself_times_interleaved_runs_and_blames_no_layer(cnn_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["compile", str(cnn_file), "-o", str(out), "--recipe", "w8a8", "--calib", "random", "--quiet"]) == 0
    capsys.readouterr()

    assert main(["eval", str(out), str(out), "--data", "random", "--json"]) == 0

    result = json.loads(capsys.readouterr().out)
    assert [lat["batch"] for lat in result["latency_ms"]] == [1, 8]
    assert all(lat["runs"] >= LATENCY_ROUNDS for lat in result["latency_ms"])
    assert result["layers"] and blame(result["layers"]) is None  # no tensor differs


def test_the_cpu_option_is_noted_as_unused_on_targets_that_do_not_read_it_and_reports_are_not_private(
        cnn_file, tmp_path):
    report = tmp_path / "report.json"
    assert main(["compile", str(cnn_file), "-o", str(tmp_path / "o.onnx"), "--recipe", "w8a8", "--calib", "random",
                 "--target", "tensorrt", "--option", "cpu=vnni", "--report", str(report), "--quiet"]) == 0
    assert any(note.startswith("option cpu=vnni was not used") for note in json.loads(report.read_text())["notes"])
    umask = os.umask(0o022)
    try:
        assert main(["compile", str(cnn_file), "-o", str(tmp_path / "o.onnx"), "--report", str(report),
                     "--quiet"]) == 0
    finally:
        os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o644


def test_no_output_lands_on_the_input_or_its_external_data(tmp_path, capsys):
    save_model(synthetic.cnn(), tmp_path / "a.onnx", external_data=True)
    (tmp_path / "a.onnx").rename(tmp_path / "b.onnx")  # b.onnx still reads a.onnx.data
    model, data = tmp_path / "b.onnx", tmp_path / "a.onnx.data"
    digests = _digest(model), _digest(data)
    for args in (["-o", str(tmp_path / "a.onnx")],  # its data would be a.onnx.data
                 ["-o", str(data)],
                 ["-o", str(tmp_path / "c.onnx"), "--report", str(model)],
                 ["-o", str(tmp_path / "c.onnx"), "--report", str(data)],
                 ["-o", str(tmp_path / "c.onnx"), "--report", str(tmp_path / "c.onnx")]):
        assert main(["compile", str(model), *args, "--quiet"]) == 2
        assert "qcompile never overwrites its input" in _error_line(capsys) or args[-1].endswith("c.onnx")
    assert (_digest(model), _digest(data)) == digests
    assert main(["compile", str(model), "-o", str(tmp_path / "c.onnx"), "--quiet"]) == 0
    assert (_digest(model), _digest(data)) == digests


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, where):
    command = ["compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")]
    with pytest.raises(UsageError, match="no such file"):
        main(["--debug", *command] if where == "before" else [*command, "--debug"])


def test_output_to_a_pipe_keeps_whole_names(tmp_path, capsys):
    """Piped or redirected, tables are not cut to 80 columns: a script or a log gets names it can use."""
    long_name = "/encoder/layers.11/attention/self/query_projection/MatMul_with_a_name_longer_than_a_terminal"
    model = parse(f"""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) <float[4, 4] w = {{{", ".join(["0.5"] * 16)}}}> {{
            y = MatMul(x, w)
        }}
    """)
    next(iter(model.graph)).name = long_name
    save_model(model, tmp_path / "long.onnx")
    assert main(["inspect", str(tmp_path / "long.onnx")]) == 0
    assert long_name in capsys.readouterr().out
