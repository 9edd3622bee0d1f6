"""`qcompile kernels`: building, finding and checking the custom-op library, and what users see when it is missing."""
import shutil

import numpy as np
import pytest

import qcompile
from qcompile import kernels
from qcompile.cli import main
from qcompile.errors import UsageError
from qcompile.ops import block_quant_matmul as op


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model_file(folder):
    attributes = dict(K=64, N=4, bits=4, block_size=32)
    weight = op.random_weight(np.random.default_rng(0), symmetric=True, **attributes)
    path = folder / "custom.onnx"
    path.write_bytes(op.make_model(*weight, **attributes).SerializeToString())
    return path


def test_the_cli_builds_finds_and_checks_the_library(kernels_library, capsys):
    assert main(["kernels", "build"]) == 0 and capsys.readouterr().out.strip() == str(kernels_library)
    assert main(["kernels", "path"]) == 0 and capsys.readouterr().out.strip() == str(kernels_library)
    assert main(["kernels", "check"]) == 0
    shown = capsys.readouterr().out
    cases = len(kernels.CHECK_CASES) + len(kernels.CODE_BOOK_CHECK_CASES) + len(kernels.OUTLIER_CHECK_CASES)
    runs = cases * len(kernels.cpu_isas())
    assert f"{runs} of {runs} passed" in shown
    assert "portable" in shown


def test_a_model_that_needs_the_library_runs_through_qcompile_session(kernels_library, tmp_path):
    path = _model_file(tmp_path)
    y = qcompile.session(path).run(None, {"A": np.ones((1, 2, 64), np.float32)})[0]
    assert y.shape == (1, 2, 4) and np.isfinite(y).all()


def test_without_the_library_users_are_told_how_to_build_it(empty_cache, tmp_path, capsys):
    path = _model_file(tmp_path)
    with pytest.raises(UsageError, match=r"is not built: run `qcompile kernels build`"):
        qcompile.session(path)
    assert main(["kernels", "path"]) == 2
    assert "not built: run `qcompile kernels build`" in capsys.readouterr().err


def test_the_headers_come_from_a_folder_the_user_names_or_from_npm(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.INCLUDE_ENV, str(tmp_path))
    with pytest.raises(UsageError, match="no onnxruntime_c_api.h there"):
        kernels.build()
    monkeypatch.delenv(kernels.INCLUDE_ENV)
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "npm" else which(tool))
    with pytest.raises(UsageError, match=rf"npm package {kernels.HEADERS_PACKAGE}: install npm, or download "
                                         rf".*set {kernels.INCLUDE_ENV}"):
        kernels.build()
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(UsageError, match="needs cmake"):
        kernels.build()


def test_the_isas_of_a_cpu():
    assert kernels.cpu_isas("flags\t: fpu sse2 avx2 fma avx512f avx512bw avx512dq avx512vl avx512_vnni") == \
        ("avx512vnni", "avx2", "portable")
    assert kernels.cpu_isas("flags\t: fpu sse2 avx2 fma") == ("avx2", "portable")
    assert kernels.cpu_isas("") == ("portable",)


def test_a_runtime_older_than_the_oldest_supported_is_refused_before_loading(kernels_library, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "runtime_supported", lambda: False)
    assert kernels.built_library() is None  # sessions do not register it
    with pytest.raises(UsageError, match=r"needs ONNX Runtime 1\.20 or newer; this is"):
        qcompile.session(_model_file(tmp_path))
