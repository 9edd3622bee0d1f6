"""The import rules of the layout (DESIGN.md), checked on the source's AST, and what `import qcompile` loads."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the import name they are installed under (pyproject's package-dir).
PACKAGES = {"qcompile": "qcompile", "passes": "qcompile.passes", "ops": "qcompile.ops", "models": "qcompile.models"}


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for folder in PACKAGES for path in (ROOT / folder).rglob("*.py")}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The qcompile modules ``name`` imports, anywhere in its body (a function-level import counts too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from package import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES}


GRAPH = nx.DiGraph([(name, imported) for name, path in MODULES.items() for imported in _imports(name, path)])


def _edges(source_prefix: str, target_prefix: str) -> list[tuple[str, str]]:
    return [(a, b) for a, b in GRAPH.edges if a.startswith(source_prefix) and b.startswith(target_prefix)]


QUANTIZATION = ("qcompile.decisions", "qcompile.calibration", "qcompile.targets", "qcompile.passes.transform",
                "qcompile.passes.analysis", "qcompile.passes.lowering", "qcompile.passes.fusion")


@pytest.mark.parametrize("source, forbidden", [
    *[("qcompile.passes.canonicalize", target) for target in QUANTIZATION],
    ("qcompile.passes.analysis", "qcompile.passes.lowering"),
    ("qcompile.passes.lowering", "qcompile.passes.analysis"),
    ("qcompile.ops", "qcompile.passes"),
    ("qcompile.models", "qcompile.passes"),
    ("qcompile.passes", "qcompile.cli"),
    ("qcompile.passes", "qcompile.recipes"),
    ("qcompile.passes", "qcompile.compiler"),
    ("qcompile.decisions", "qcompile.passes"),
    ("qcompile.calibration", "qcompile.passes"),
    ("qcompile.targets", "qcompile.passes"),
])
def test_layer_does_not_import(source, forbidden):
    assert _edges(source, forbidden) == []


def test_no_import_cycles():
    assert list(nx.simple_cycles(GRAPH)) == []


def test_the_rules_see_real_imports():
    """The checker itself finds edges that exist, so an empty result above means something."""
    assert ("qcompile.recipes.int8", "qcompile.passes.analysis.calibrate_activations") in GRAPH.edges
    assert ("qcompile.passes.lowering.quantize_weights", "qcompile.decisions") in GRAPH.edges
    assert ("qcompile.decisions.spec", "qcompile.decisions.grids") in GRAPH.edges


def _loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``statement``."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_importing_the_package_or_the_cli_loads_no_pass_and_no_numerics():
    for statement in ("import qcompile", "import qcompile.cli"):
        loaded = _loaded_by(statement)
        assert not {m for m in loaded if m.startswith("qcompile.passes")}, statement
        assert not {"numpy", "onnx", "onnx_ir", "onnxruntime"} & loaded, statement


def test_a_recipe_family_loads_only_the_passes_it_runs():
    loaded = _loaded_by("from qcompile.recipes import get_recipe; get_recipe('canonicalize')")
    passes = {m for m in loaded if m.startswith("qcompile.passes.")}
    assert passes and all(m.startswith("qcompile.passes.canonicalize") for m in passes)
