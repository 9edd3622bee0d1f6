"""What a recipe is: a name, a typed options dataclass, and a function from `Settings` to a pass list."""
from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import onnx_ir as ir

from qcompile.calibration import CalibrationData
from qcompile.config import NodeSettings
from qcompile.errors import UsageError
from qcompile.targets import DEFAULT_TARGET, TARGETS, Target


def option(default: bool | int | float | str, help: str):
    """A recipe option: a dataclass field with its `--option` help."""
    return field(default=default, metadata={"help": help})


def option_help(options_type: type) -> dict[str, tuple[object, str]]:
    """Each option of an options dataclass: (default, help)."""
    return {f.name: (f.default, f.metadata.get("help", "")) for f in fields(options_type)}


def _parse(key: str, kind: type, text) -> bool | int | float | str:
    """``text`` from the command line or a config file, or an already typed value (Python API)."""
    if not isinstance(text, str):
        if type(text) is kind or (kind is float and type(text) is int):
            return kind(text)
        if kind is str and type(text) in (int, float):  # smoothquant=0.5: a number where text is allowed
            return str(text)
        raise UsageError(f"option {key}: expected {kind.__name__}, got {text!r}")
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise UsageError(f"option {key}: expected true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"option {key}: expected {kind.__name__}, got {text!r}") from None


@dataclass(frozen=True)
class NoOptions:
    """A recipe without options."""


@dataclass(frozen=True)
class Settings:
    """Everything a recipe's pass list depends on."""

    target: Target = TARGETS[DEFAULT_TARGET]
    options: typing.Any = NoOptions()  # the recipe's options dataclass
    exclude: tuple[str, ...] = ()
    calib: CalibrationData | None = None
    nodes: tuple[NodeSettings, ...] = ()  # [[nodes]] tables of a --config file

    @property
    def excluded(self) -> tuple[str, ...]:
        """--exclude patterns and those of [[nodes]] tables with quantize = false."""
        return self.exclude + tuple(p for table in self.nodes if table.quantize is False for p in table.match)

    def require_calib(self, recipe: str, without_data: str | None = None) -> CalibrationData:
        """The calibration data; ``without_data`` names recipes to suggest that need none."""
        if self.calib is None:
            raise UsageError(f"recipe {recipe} calibrates: give --calib DATA (or --calib random for a smoke test)"
                             + (f", or use {without_data}, which need no data" if without_data else ""))
        return self.calib


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    options: type = NoOptions  # a frozen dataclass whose fields are made with `option`
    build: Callable[[Settings], list[ir.passes.PassBase]] | None = None  # None: planned, not built yet

    def resolve_options(self, given: dict) -> typing.Any:
        """The recipe's options from ``--option`` texts (or typed values), defaults for the rest."""
        known = {f.name: f for f in fields(self.options)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UsageError(f"recipe {self.name} has no option {unknown[0]!r} "
                             f"(its options: {', '.join(sorted(known)) or 'none'})")
        values = {key: _parse(key, type(known[key].default), value) for key, value in given.items()}
        return self.options(**values)
