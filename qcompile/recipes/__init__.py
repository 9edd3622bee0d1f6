"""Recipes: named, inspectable pass lists with typed options (`--option KEY=VALUE`).

One module per family (`int8`, `int4` (NF4 too), `fp8`, and `llm_int8`, `auto` as they are built), each
with a ``RECIPES`` list; this registry names the module of each recipe and imports it only when the
recipe is asked for, so listing or compiling with one family does not load the passes of the others.
"""
from __future__ import annotations

import importlib

from qcompile.errors import UsageError
from qcompile.recipes.base import Recipe, Settings

# recipe name -> the family module that defines it
FAMILIES = {
    "canonicalize": "canonical",
    "w8a16": "int8",
    "w8a8": "int8",
    "w8a8-dynamic": "int8",
    "w8a8-smoothquant": "int8",
    "w4a16-rtn": "int4",
    "w4a16-hqq": "int4",
    "w4a16-gptq": "int4",
    "w4a16-awq": "int4",
    "nf4": "int4",
    "fp8": "fp8",
    "llm-int8": "llm_int8",
}
# Recipes in the interface (INTERFACE.md) that are not built yet.
PLANNED = {
    "auto": "per-layer mixed precision chosen by measured sensitivity",
}


def _load(name: str) -> Recipe:
    module = importlib.import_module(f"{__name__}.{FAMILIES[name]}")
    return next(recipe for recipe in module.RECIPES if recipe.name == name)


def get_recipe(name: str) -> Recipe:
    if name in PLANNED:
        raise UsageError(f"recipe {name!r} is planned but not built yet; available: {', '.join(FAMILIES)}")
    if name not in FAMILIES:
        raise UsageError(f"unknown recipe {name!r}; `qcompile recipes` lists them")
    return _load(name)


def all_recipes() -> list[Recipe]:
    """Every recipe, built and planned (a planned one has no ``build``), in the order `qcompile recipes` lists them."""
    return [_load(name) for name in FAMILIES] + [Recipe(name, summary) for name, summary in PLANNED.items()]


__all__ = ["FAMILIES", "PLANNED", "Recipe", "Settings", "all_recipes", "get_recipe"]
