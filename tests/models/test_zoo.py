import onnx

from qcompile.models.__main__ import main


def test_list_names_the_real_and_synthetic_models(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mobilenetv2", "minilm", "smollm2", "mlp", "cnn", "transformer-block", "if-graph"):
        assert name in out


def test_build_prints_a_path_to_a_valid_model_and_copies_to_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    assert main(["build", "cnn", "--output", str(tmp_path / "cnn.onnx")]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "cnn.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert (tmp_path / "cache" / "models" / "cnn-v1" / "cnn.onnx").is_file()


def test_unknown_model_is_exit_2(capsys):
    assert main(["build", "resnet9000"]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err
