"""`--config RECIPE.toml`: the same settings as the command line, in a file.

    recipe = "w8a16"
    target = "ort-cpu"
    exclude = ["/classifier/*"]
    [options]
    per_channel = true

    [[nodes]]                          # settings for the nodes whose names match (fnmatch patterns)
    match = ["features.16.*"]
    calib_method = "percentile"        # for the activations these nodes read quantized
    percentile = 99.99
    activation_bits = 16               # 8 (the recipe's) or 16: the grid of those activations
    per_channel = false                # for their weights
    [[nodes]]
    match = ["classifier.*"]
    quantize = false                   # the same as listing the patterns in exclude

Command-line flags override the file; where several [[nodes]] tables match a node, the later wins.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace

from qcompile.errors import UsageError
from qcompile.graph import name_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEYS = {"recipe", "target", "exclude", "options", "nodes"}
CALIB_METHODS = ("minmax", "percentile", "entropy", "mse")
ACTIVATION_BITS = (8, 16)


@dataclass(frozen=True)
class NodeSettings:
    """One ``[[nodes]]`` table: settings for the nodes whose names match a pattern; None: the recipe's."""

    match: tuple[str, ...]
    quantize: bool | None = None
    per_channel: bool | None = None
    calib_method: str | None = None
    percentile: float | None = None
    activation_bits: int | None = None

    def matches(self, name: str | None) -> bool:
        return name_matches(name, self.match)

    @classmethod
    def parse(cls, path, index: int, table) -> NodeSettings:
        where = f"{path}: [[nodes]] table {index + 1}"
        if not isinstance(table, dict):
            raise UsageError(f"{where} is not a table")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        match = table.get("match")
        if isinstance(match, str):
            match = [match]
        if not match or not isinstance(match, list) or not all(isinstance(m, str) for m in match):
            raise UsageError(f"{where}: match must be a node name or pattern, or a list of them")
        for key in ("quantize", "per_channel"):
            if key in table and not isinstance(table[key], bool):
                raise UsageError(f"{where}: {key} must be true or false")
        if table.get("calib_method", "minmax") not in CALIB_METHODS:
            raise UsageError(f"{where}: calib_method must be one of {', '.join(CALIB_METHODS)}")
        percentile = table.get("percentile")
        if percentile is not None and (isinstance(percentile, bool) or not isinstance(percentile, (int, float))
                                       or not 0 < percentile <= 100):
            raise UsageError(f"{where}: percentile must be a number in (0, 100]")
        bits = table.get("activation_bits")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in ACTIVATION_BITS):
            raise UsageError(f"{where}: activation_bits must be {' or '.join(map(str, ACTIVATION_BITS))}")
        return cls(tuple(match), table.get("quantize"), table.get("per_channel"), table.get("calib_method"),
                   None if percentile is None else float(percentile), bits)


def settings_for(nodes: tuple[NodeSettings, ...], name: str | None) -> dict:
    """The [[nodes]] settings that apply to the node called ``name`` (later tables win), without Nones."""
    merged = {}
    for table in nodes:
        if table.matches(name):
            merged.update({f.name: getattr(table, f.name) for f in fields(table)
                           if f.name != "match" and getattr(table, f.name) is not None})
    return merged


@dataclass(frozen=True)
class CompileConfig:
    recipe: str = "w8a16"
    target: str = "ort-cpu"
    options: dict[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    nodes: tuple[NodeSettings, ...] = ()

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
        tables = data.get("nodes", [])
        if not isinstance(tables, list):
            raise UsageError(f"{path}: nodes must be an array of tables ([[nodes]])")
        nodes = tuple(NodeSettings.parse(path, i, table) for i, table in enumerate(tables))
        defaults = cls()
        return cls(str(data.get("recipe", defaults.recipe)), str(data.get("target", defaults.target)),
                   as_text, tuple(exclude), nodes)

    def merged(self, recipe: str | None, target: str | None, options: dict[str, str],
               exclude: tuple[str, ...]) -> CompileConfig:
        return replace(self, recipe=recipe or self.recipe, target=target or self.target,
                       options={**self.options, **options}, exclude=self.exclude + tuple(exclude))
