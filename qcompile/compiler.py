"""The public compile entry point: load, run a recipe's pipeline, report, save, verify."""
from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

import qcompile
from qcompile.config import CompileConfig, NodeSettings
from qcompile.data import count_samples, model_inputs
from qcompile.errors import UsageError
from qcompile.graph import all_nodes, name_matches
from qcompile.io import check_not_input, load_model, model_files, save_model
from qcompile.layers import layer_precisions
from qcompile.notes import notes
from qcompile.op_rules import COMPUTE_OPS
from qcompile.passes.lowering.insert_qdq import MIN_OPSET_16BIT_QDQ
from qcompile.pipeline import Pipeline, PassRecord, dump_to_folder
from qcompile.recipes import TARGETS, Settings, get_recipe
from qcompile.target_check import checked_on
from qcompile.targets import CPU_TARGETS, QDQ_SEMANTICS_TARGETS, cpu_profile
from qcompile.verify import blame, compare_models, layer_errors


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus the external data files it references."""
    return sum(file.stat().st_size for file in model_files(path))


def versions() -> dict:
    from qcompile.runtime import onnxruntime

    return {"qcompile": qcompile.__version__, "onnx": onnx.__version__, "onnx_ir": ir.__version__,
            "onnxruntime": onnxruntime().__version__, "python": platform.python_version()}


@dataclass
class CompileResult:
    model: ir.Model
    report: dict = field(default_factory=dict)
    _input: Path | None = None

    def save(self, path: str | os.PathLike) -> Path:
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"save: expected a file path, got {path!r}")
        path = Path(path)
        if self._input is not None:
            check_not_input(path, self._input, with_data=True)
        save_model(self.model, path)
        self.report["output"] = str(path)
        self.report["size_bytes"]["after"] = file_bytes(path)
        return path

    def verify(self, data: str, limit: int | None = None, seed: int = 0, min_sqnr: float | None = None) -> dict:
        """Compare against the input model on ``data``; saves to a temp folder if not saved yet."""
        data = str(_path("data", data))
        limit = None if limit is None else _whole("limit", limit, 1)
        seed = _whole("seed", seed, 0)
        if min_sqnr is not None and (isinstance(min_sqnr, bool) or not isinstance(min_sqnr, (int, float))
                                     or not math.isfinite(min_sqnr)):
            raise UsageError(f"min_sqnr: expected a finite number of dB, got {min_sqnr!r}")
        output = self.report.get("output")
        with tempfile.TemporaryDirectory() as tmp:
            if output is None:
                output = save_model(self.model, Path(tmp) / "candidate.onnx")
            inputs = model_inputs(load_model(self._input))
            integer_kernels = self.report["target"] not in QDQ_SEMANTICS_TARGETS
            result = compare_models(self._input, output, data, inputs, limit, seed, integer_kernels)
            result["runtime"] = checked_on(self.model, self.report["target"])
            result["min_sqnr_db"] = min_sqnr
            result["passed"] = min_sqnr is None or all(o["sqnr_db"] >= min_sqnr for o in result["outputs"])
            if not result["passed"]:  # say which layer is to blame
                result["layers"] = layer_errors(self._input, output, data, inputs, limit, seed, integer_kernels)
                result["blame"] = blame(result["layers"])
        self.report["verification"] = result
        return result


# Passes that run the model on the calibration data.
DATA_PASSES = {"calibrate-activations", "correct-bias", "smooth-activations", "equalize-depthwise-inputs"}


# [[nodes]] keys and the pass that reads them.
NODE_SETTING_READERS = {"calib_method": "calibrate-activations", "percentile": "calibrate-activations",
                        "activation_bits": "calibrate-activations", "per_channel": "assign-weight-specs"}


def unused_node_settings(nodes: tuple[NodeSettings, ...], recipe: str, pass_names: set[str]) -> list[str]:
    """A note for each [[nodes]] key that no pass of the recipe reads."""
    given = {key for table in nodes for key in NODE_SETTING_READERS if getattr(table, key) is not None}
    return [f"[[nodes]] {key}: recipe {recipe} does not run {NODE_SETTING_READERS[key]}, so it was not used"
            for key in sorted(given) if NODE_SETTING_READERS[key] not in pass_names]


def unused_percentiles(nodes: tuple[NodeSettings, ...], recipe_method: str | None) -> list[str]:
    """A note for each [[nodes]] percentile whose nodes are not calibrated by percentile."""
    return [f"[[nodes]] match {list(table.match)}: percentile = {table.percentile} was not used: these nodes are "
            f"calibrated with {table.calib_method or recipe_method}, not percentile"
            for table in nodes if table.percentile is not None and recipe_method is not None
            and (table.calib_method or recipe_method) != "percentile"]


def check_16bit_opset(settings: CompileConfig, model: ir.Model, pass_names: set[str]) -> None:
    """Refuse before calibrating what `InsertQDQPass` would refuse after: 16-bit activations for target
    portable in a model whose opset has no 16-bit QuantizeLinear/DequantizeLinear."""
    opset = model.opset_imports.get("", 1)
    if (settings.target != "portable" or opset >= MIN_OPSET_16BIT_QDQ
            or NODE_SETTING_READERS["activation_bits"] not in pass_names):
        return
    names = [node.name for node in all_nodes(model)]
    for pattern in (p for table in settings.nodes if table.activation_bits == 16 for p in table.match):
        if any(name_matches(name, (pattern,)) for name in names):
            raise UsageError(f"[[nodes]] match {pattern!r}: activation_bits = 16 needs 16-bit QuantizeLinear/"
                             f"DequantizeLinear, which need opset {MIN_OPSET_16BIT_QDQ}, the model has opset {opset} "
                             f"(or use target ort-cpu)")


def _path(what: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{what}: expected a file path, got {value!r}")
    return Path(value)


def _names(what: str, value) -> tuple[str, ...]:
    """A tuple of names from one name or an iterable of them (a lone string is not its letters)."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Iterable) or not all(isinstance(name, str) for name in names):
        raise UsageError(f"{what}: expected a name or a list of names, got {value!r}")
    return tuple(names)


def _whole(what: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{what}: expected a whole number of at least {minimum}, got {value!r}")
    return value


def check_float32(model: ir.Model, path: Path) -> None:
    """Refuse a model whose matmuls or convolutions compute in another float type: the passes quantize
    float32 values (ONNX Runtime has no float16 QuantizeLinear / QLinear* kernels on the CPU)."""
    for node in all_nodes(model):
        if node.op_type not in COMPUTE_OPS:
            continue
        dtype = next((v.dtype for v in node.inputs if v is not None and v.dtype is not None
                      and v.dtype.is_floating_point() and v.dtype != ir.DataType.FLOAT), None)
        if dtype is not None:
            which = f"{node.op_type} {node.name!r}" if node.name else f"an unnamed {node.op_type}"
            raise UsageError(f"{path}: {which} computes in {dtype.name.lower()}; qcompile "
                             f"quantizes float32 models: export the model in float32")


def unmatched_patterns(settings: CompileConfig, before: list[str], after: list[str]) -> list[str]:
    """A note for each --exclude / [[nodes]] pattern that names no node of the compiled model."""
    patterns = [("--exclude", p) for p in settings.exclude] + [("[[nodes]] match", p) for t in settings.nodes
                                                               for p in t.match]
    found = []
    for where, pattern in patterns:
        if any(name_matches(name, (pattern,)) for name in after):
            continue
        why = ("it named nodes that were folded into others, such as a BatchNormalization into its Conv: "
               "name those" if any(name_matches(name, (pattern,)) for name in before) else "nor of the input")
        found.append(f"{where} {pattern!r} matches no node of the compiled model ({why})")
    return found


def compile(input: str | os.PathLike, recipe: str | None = None, target: str | None = None,
            calib: str | None = None, calib_size: int | None = None, options: dict[str, str] | None = None,
            exclude: tuple[str, ...] = (), config: str | os.PathLike | None = None, verify_each: bool = False,
            dump_after: tuple[str, ...] = (), dump_dir: str | os.PathLike | None = None,
            seed: int = 0) -> CompileResult:
    """Compile ``input`` with a recipe; nothing is written until `CompileResult.save`."""
    input_path = _path("input", input)
    calib = None if calib is None else str(_path("calib", calib))
    exclude, dump_after = _names("exclude", exclude), _names("dump_after", dump_after)
    calib_size = None if calib_size is None else _whole("calib_size", calib_size, 1)
    seed = _whole("seed", seed, 0)
    if options is not None and not isinstance(options, Mapping):
        raise UsageError(f"options: expected a dict of option names to values, got {options!r}")
    settings = CompileConfig.load(config) if config else CompileConfig()
    settings = settings.merged(recipe=recipe, target=target, options=options or {}, exclude=exclude)
    if settings.target not in TARGETS:
        raise UsageError(f"unknown target {settings.target!r} (one of {', '.join(TARGETS)})")
    chosen = get_recipe(settings.recipe)
    resolved = chosen.resolve_options(settings.options)
    passes = chosen.build(Settings(settings.target, resolved, tuple(settings.exclude), calib, calib_size, seed,
                                   settings.nodes))
    names = {getattr(p, "name", "") for p in passes}
    unknown = [d for d in dump_after if d not in names]
    if unknown:
        raise UsageError(f"--dump-after {unknown[0]}: recipe {chosen.name} has no such pass ({', '.join(sorted(names))})")

    model = load_model(input_path)
    check_float32(model, input_path)
    check_16bit_opset(settings, model, names)
    input_nodes = [node.name for node in all_nodes(model)]
    dump = dump_to_folder(Path(dump_dir or "."), input_path.stem, set(dump_after)) if dump_after else None
    records = Pipeline(passes, verify_each=verify_each, dump_after=dump).run(model)
    unused_inputs = ([f"recipe {chosen.name} as set up reads no data: --calib {calib} was not used"]
                     if calib and not DATA_PASSES & names else []) + unused_node_settings(settings.nodes, chosen.name,
                                                                                          names)
    unused_inputs += unused_percentiles(settings.nodes, resolved.get("calib_method"))
    unused_inputs += unmatched_patterns(settings, input_nodes, [node.name for node in all_nodes(model)])
    available = (count_samples(calib, model_inputs(model), calib_size) if calib and calib_size and DATA_PASSES & names
                 else None)
    if available is not None and available < calib_size:
        unused_inputs.append(f"--calib-size {calib_size}: {calib} holds {available} samples; all of them were used")
    if "cpu" in settings.options and settings.target not in CPU_TARGETS:
        unused_inputs.append(f"option cpu={settings.options['cpu']} was not used: it is for targets "
                             f"{' and '.join(CPU_TARGETS)}, and {settings.target} computes Q/DQ as ONNX defines them")
    report = {
        "recipe": chosen.name,
        "options": {k: v for k, v in resolved.items() if k != "cpu" or settings.target in CPU_TARGETS},
        "node_settings": [asdict(table) for table in settings.nodes],
        "target": settings.target,
        "input": str(input_path),
        "output": None,
        "passes": [asdict(r) for r in records],
        "size_bytes": {"before": file_bytes(input_path), "after": None},
        "layers": layer_precisions(model),
        "notes": notes(model) + unused_inputs,
        "cpu": asdict(cpu_profile(resolved["cpu"])) if settings.target in CPU_TARGETS and "cpu" in resolved
        else None,
        "verification": None,
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    return CompileResult(model, report, input_path)


__all__ = ["compile", "CompileResult", "PassRecord"]
