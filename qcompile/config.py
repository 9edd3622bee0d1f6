"""`--config RECIPE.toml`: the same settings as the command line, in a file.

    recipe = "w8a16"
    target = "ort-cpu"
    exclude = ["/classifier/*"]
    [options]
    per_channel = true

Command-line flags override the file.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace

from qcompile.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEYS = {"recipe", "target", "exclude", "options"}


@dataclass(frozen=True)
class CompileConfig:
    recipe: str = "w8a16"
    target: str = "ort-cpu"
    options: dict[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompileConfig:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise UsageError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML ({exc})") from None
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise UsageError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise UsageError(f"{path}: [options] must be a table")
        # Options are kept as text, like --option KEY=VALUE, and parsed by the recipe.
        as_text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
        exclude = data.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise UsageError(f"{path}: exclude must be a list of strings")
        defaults = cls()
        return cls(str(data.get("recipe", defaults.recipe)), str(data.get("target", defaults.target)),
                   as_text, tuple(exclude))

    def merged(self, recipe: str | None, target: str | None, options: dict[str, str],
               exclude: tuple[str, ...]) -> CompileConfig:
        return replace(self, recipe=recipe or self.recipe, target=target or self.target,
                       options={**self.options, **options}, exclude=self.exclude + tuple(exclude))
