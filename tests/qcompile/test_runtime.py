import importlib.metadata

import pytest

from qcompile import runtime
from qcompile.errors import UsageError


def _installed(monkeypatch, versions: dict[str, str]):
    def version(dist):
        if dist in versions:
            return versions[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_both_runtimes_installed_is_refused_with_the_repair(monkeypatch):
    _installed(monkeypatch, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    with pytest.raises(UsageError, match="both onnxruntime==1.32.0 and onnxruntime-gpu==1.31.1 .* uninstall both"):
        runtime.onnxruntime()


def test_no_runtime_says_which_extra_to_install(monkeypatch):
    _installed(monkeypatch, {})
    with pytest.raises(UsageError, match=r"pip install 'qcompile\[cpu\]'"):
        runtime.onnxruntime()


def test_the_installed_runtime_imports():
    ort = runtime.onnxruntime()
    assert "CPUExecutionProvider" in ort.get_available_providers()
