"""qcompile: a quantization compiler for ONNX models."""
__version__ = "0.1.0"

from qcompile.compiler import CompileResult, compile  # noqa: E402
from qcompile.session import session  # noqa: E402

__all__ = ["compile", "CompileResult", "session", "__version__"]
