"""The ONNX Runtime that qcompile runs on: exactly one of `onnxruntime` or `onnxruntime-gpu`.

Both wheels install into the same `onnxruntime/` folder and silently overwrite each other, so a mix
is detected here and refused with a message that says how to repair it.
"""
from __future__ import annotations

import importlib.metadata
from types import ModuleType

from qcompile.errors import UsageError

RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
OLDEST_SUPPORTED = (1, 20)


def installed_runtimes() -> list[str]:
    found = []
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            found.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def runtime_version(ort: ModuleType) -> tuple[int, int]:
    """(major, minor) of an imported onnxruntime."""
    return tuple(int(p) for p in ort.__version__.split(".")[:2])


def onnxruntime() -> ModuleType:
    """Import onnxruntime, or explain in one line why it cannot be used."""
    found = installed_runtimes()
    if len(found) > 1:
        raise UsageError(
            f"both {' and '.join(found)} are installed and overwrite each other; "
            "uninstall both, then install one: pip install 'qcompile[cpu]' or 'qcompile[gpu]'"
        )
    if not found:
        raise UsageError("no ONNX Runtime installed: pip install 'qcompile[cpu]' (or 'qcompile[gpu]')")
    try:
        import onnxruntime as ort
    except ImportError as exc:  # a half-removed wheel leaves the folder without its binary
        raise UsageError(f"{found[0]} is installed but does not import ({exc}); reinstall it") from exc
    if runtime_version(ort) < OLDEST_SUPPORTED:
        raise UsageError(
            f"onnxruntime {ort.__version__} is older than the oldest supported "
            f"{'.'.join(map(str, OLDEST_SUPPORTED))}"
        )
    return ort


if __name__ == "__main__":
    import sys

    try:
        ort = onnxruntime()
    except UsageError as exc:
        sys.exit(f"qcompile: error: {exc}")
    print(f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})")
