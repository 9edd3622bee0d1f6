import os
import shutil

import pytest

# Every pipeline run in the tests checks the ONNX checker and our invariants after each pass.
os.environ["QCOMPILE_VERIFY_EACH"] = "1"


@pytest.fixture(scope="session")
def kernels_library():
    """qcompile's custom-op library, built once (into the cache dir, reused while its sources are unchanged)."""
    from qcompile import kernels

    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the custom-op library needs {' and '.join(missing)}")
    return kernels.build()
