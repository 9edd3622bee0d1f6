"""Graph passes, one per module, grouped by what they do:

* `canonicalize/`: clean the float graph (opset, shapes, constants, BatchNorm, MatMul+Add);
* `transform/`: rewrite the float graph before it is calibrated, exactly (untie weights, apply the
  SmoothQuant and equalization decisions);
* `analysis/`: decide, and only attach decisions (`qcompile.decisions`);
* `lowering/`: consume decisions into quantized ops (Q/DQ, integer and contrib ops, corrected biases);
* `fusion/`: clean up and fuse the lowered graph.

Nothing is imported here: a pass module is loaded by the recipe that runs it. `registry` finds them all.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import onnx_ir as ir


def registry() -> dict[str, type[ir.passes.PassBase]]:
    """Every pass, by its kebab-case name, found by importing each module of this package."""
    found = {}
    for module_info in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ir.passes.PassBase) and cls.__module__ == module.__name__ and hasattr(cls, "name"):
                found[cls.name] = cls
    return found


def summary(pass_type: type[ir.passes.PassBase]) -> str:
    return (pass_type.__doc__ or "").strip().splitlines()[0]
