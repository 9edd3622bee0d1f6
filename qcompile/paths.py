"""Where qcompile keeps what it builds: the user cache dir, never the repository."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/qcompile``, else ``~/.cache/qcompile``."""
    if env := os.environ.get("QCOMPILE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qcompile"
