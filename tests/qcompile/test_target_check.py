import numpy as np
import pytest

import qcompile
from qcompile.cli import main
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile import target_check
from qcompile.target_check import checked_on, target_problems
from qcompile.targets import TARGETS


@pytest.fixture
def cnn(tmp_path):
    source = save_model(synthetic.cnn(), tmp_path / "cnn.onnx")
    x = np.random.default_rng(0).standard_normal((4, *synthetic.cnn().graph.inputs[0].shape[1:])).astype(np.float32)
    np.savez(tmp_path / "calib.npz", **{synthetic.cnn().graph.inputs[0].name: x})
    return source, str(tmp_path / "calib.npz")


def _compile(cnn, recipe="w8a8", target=None, **options):
    source, calib = cnn
    return qcompile.compile(source, recipe=recipe, target=target, calib=calib,
                            options={k: str(v) for k, v in options.items()}).model


def test_a_tensorrt_build_passes_its_check_and_an_ort_cpu_build_does_not(cnn):
    assert target_problems(_compile(cnn, target="tensorrt"), TARGETS["tensorrt"]) == []
    problems = target_problems(_compile(cnn), TARGETS["tensorrt"])
    assert any("zero point 0" in p for p in problems)
    assert any("float biases" in p for p in problems)


def test_full_range_int8_weights_are_flagged_for_cpus_without_vnni(cnn):
    problems = target_problems(_compile(cnn, cpu="vnni"), TARGETS["ort-cpu"])
    assert problems and all("saturates" in p for p in problems)
    assert target_problems(_compile(cnn, cpu="any"), TARGETS["ort-cpu"]) == []
    assert target_problems(_compile(cnn, cpu="7bit"), TARGETS["ort-cpu"]) == []


def test_contrib_ops_are_flagged_for_portable_onnx(tmp_path):
    source = save_model(synthetic.mlp(), tmp_path / "mlp.onnx")
    ort_build = qcompile.compile(source, recipe="w8a8-dynamic").model
    assert any("com.microsoft" in p for p in target_problems(ort_build, TARGETS["portable"]))
    assert target_problems(ort_build, TARGETS["ort-cpu"]) == []
    assert target_problems(qcompile.compile(source, recipe="w8a8-dynamic", target="portable").model, TARGETS["portable"]) == []


def test_inspect_target_exit_codes(cnn, tmp_path, capsys):
    qcompile.compile(cnn[0], recipe="w8a8", calib=cnn[1], target="tensorrt").save(tmp_path / "trt.onnx")
    qcompile.compile(cnn[0], recipe="w8a8", calib=cnn[1]).save(tmp_path / "cpu.onnx")
    assert main(["inspect", str(tmp_path / "trt.onnx"), "--target", "tensorrt"]) == 0
    assert main(["inspect", str(tmp_path / "cpu.onnx"), "--target", "tensorrt"]) == 1
    assert "problem(s)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "cpu.onnx"), "--target", "tpu"]) == 2
    assert "unknown target 'tpu'" in capsys.readouterr().err


def test_a_tensorrt_build_with_int8_activations_is_flagged_for_cpus_without_vnni(cnn):
    problems = target_problems(_compile(cnn, target="tensorrt"), TARGETS["ort-cpu"])
    assert problems and all("saturates" in p for p in problems)


def test_verifying_integer_ops_for_a_gpu_target_on_a_cpu_without_vnni_says_the_error_is_the_cpus(
        tmp_path, monkeypatch):
    source = save_model(synthetic.mlp(), tmp_path / "mlp.onnx")
    cuda_build = qcompile.compile(source, recipe="w8a8-dynamic", target="ort-cuda").model
    monkeypatch.setattr(target_check, "has_vnni", lambda: False)
    assert "saturate without VNNI: the error shown is larger than ort-cuda's" in checked_on(cuda_build, TARGETS["ort-cuda"])
    cpu_build = qcompile.compile(source, recipe="w8a8-dynamic").model  # pair-limited weights: exact
    assert "saturate" not in checked_on(cpu_build, TARGETS["ort-cuda"])
    monkeypatch.setattr(target_check, "has_vnni", lambda: True)
    assert "saturate" not in checked_on(cuda_build, TARGETS["ort-cuda"])


def test_an_already_quantized_model_is_kept_where_the_target_runs_it_and_refused_in_one_line_where_not(
        cnn, tmp_path, capsys):
    source, calib = cnn
    quantized = tmp_path / "quantized.onnx"
    qcompile.compile(source, recipe="w8a8", calib=calib, options={"cpu": "vnni"}).save(quantized)  # u8, full range
    out = tmp_path / "out.onnx"

    code = main(["compile", str(quantized), "-o", str(out), "--target", "tensorrt", "--calib", calib])
    assert code == 2 and not out.exists()
    line = capsys.readouterr().err.strip()
    assert "already quantized" in line and "tensorrt cannot run" in line and "compile the float model" in line
    code = main(["compile", str(quantized), "-o", str(out), "--calib", calib])  # AVX2 CPUs would saturate
    assert code == 2 and "--option cpu=vnni" in capsys.readouterr().err

    kept = qcompile.compile(quantized, recipe="w8a8", calib=calib, options={"cpu": "vnni"})
    assert any("already quantized" in note for note in kept.report["notes"])
    assert target_problems(kept.model, TARGETS["ort-cpu"], vnni_only=True) == []
