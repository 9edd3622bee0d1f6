"""qcompile: a quantization compiler for ONNX models.

The public API is loaded on first use, so that importing any module of the package (the CLI's
``--help``, a pass) does not load the compiler and every pass behind it.
"""
__version__ = "0.1.0"
__all__ = ["compile", "CompileResult", "session", "__version__"]

# Light (no numpy, onnx or passes), and eager: the function must shadow the submodule of the same name.
from qcompile.session import session  # noqa: E402

_API = {"compile": "qcompile.compiler", "CompileResult": "qcompile.compiler"}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
