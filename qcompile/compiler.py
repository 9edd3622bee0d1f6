"""The public compile entry point: load, run a recipe's pipeline, report, save, verify."""
from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import onnx
import onnx_ir as ir

from qcompile import __version__
from qcompile.calibration import CalibrationData
from qcompile.config import CompileConfig, NodeSettings
from qcompile.data import model_inputs
from qcompile.errors import UsageError
from qcompile.graph import all_nodes, name_matches
from qcompile.io import check_not_input, load_model, model_files, save_model
from qcompile.layers import layer_precisions
from qcompile.memory import peak_bytes, reset_peak
from qcompile.notes import notes
from qcompile.op_rules import COMPUTE_OPS
from qcompile.pipeline import Pipeline, dump_to_folder, pass_name
from qcompile.placement import choose_placement
from qcompile.recipes import Settings, get_recipe
from qcompile.report import Latency, Layer, OutputError, PassRecord, Report, SizeBytes, Verification
from qcompile.session import session
from qcompile.target_check import check_already_quantized, checked_on
from qcompile.targets import TARGETS, get_target
from qcompile.targets.x86 import cpu_profile
from qcompile.verify import blame, compare_models, layer_errors


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus the external data files it references."""
    return sum(file.stat().st_size for file in model_files(path))


def versions() -> dict:
    from qcompile.runtime import onnxruntime

    return {"qcompile": __version__, "onnx": onnx.__version__, "onnx_ir": ir.__version__,
            "onnxruntime": onnxruntime().__version__, "python": platform.python_version()}


@dataclass
class CompileResult:
    model: ir.Model
    typed_report: Report
    _input: Path | None = None

    @property
    def report(self) -> dict:
        """The report as `--report` writes it (a new dict on each access; `typed_report` is the source)."""
        return self.typed_report.to_json()

    def save(self, path: str | os.PathLike) -> Path:
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"save: expected a file path, got {path!r}")
        path = Path(path)
        if self._input is not None:
            check_not_input(path, self._input, with_data=True)
        save_model(self.model, path)
        self.typed_report.output = str(path)
        self.typed_report.size_bytes.after = file_bytes(path)
        return path

    def verify(self, data: str, limit: int | None = None, seed: int = 0, min_sqnr: float | None = None) -> dict:
        """Compare against the input model on ``data``; saves to a temp folder if not saved yet."""
        data = str(_path("data", data))
        limit = None if limit is None else _whole("limit", limit, 1)
        seed = _whole("seed", seed, 0)
        if min_sqnr is not None and (isinstance(min_sqnr, bool) or not isinstance(min_sqnr, (int, float))
                                     or not math.isfinite(min_sqnr)):
            raise UsageError(f"min_sqnr: expected a finite number of dB, got {min_sqnr!r}")
        output = self.typed_report.output
        target = get_target(self.typed_report.target)
        with tempfile.TemporaryDirectory() as tmp:
            if output is None:
                output = save_model(self.model, Path(tmp) / "candidate.onnx")
            inputs = model_inputs(load_model(self._input))
            compared = compare_models(self._input, output, data, inputs, target, limit, seed)
            outputs = [OutputError(**o) for o in compared["outputs"]]
            latency = compared.get("latency_ms")
            verification = Verification(compared["samples"], outputs, checked_on(self.model, target),
                                        [Latency(**row) for row in latency] if latency else None,
                                        compared.get("latency_note"), min_sqnr,
                                        min_sqnr is None or all(o.sqnr_db >= min_sqnr for o in outputs))
            if not verification.passed:  # say which layer is to blame
                verification.layers = layer_errors(self._input, output, data, inputs, target, limit, seed)
                verification.blame = blame(verification.layers)
        self.typed_report.verification = verification
        return verification.to_json()

    def verify_perplexity(self, text: str | os.PathLike, tokenizer: str | os.PathLike,
                          max_ratio: float | None = None, window: int = 512, stride: int = 256) -> dict:
        """Both models' perplexity on ``text`` (decoder LMs, the tokenizer.json ``tokenizer``), added to the
        verification (after `verify`); failed where the compiled model's is more than ``max_ratio`` times the
        input model's."""
        from qcompile.perplexity import LanguageModel, compare_perplexity, load_tokenizer, token_ids

        if self.typed_report.verification is None:
            raise UsageError("verify_perplexity: run verify first")
        if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
                                      or not math.isfinite(max_ratio) or max_ratio < 1):
            raise UsageError(f"max_ratio: expected a finite number of at least 1, got {max_ratio!r}")
        words = load_tokenizer(tokenizer)
        ids = token_ids(text, words)
        target = get_target(self.typed_report.target)
        with tempfile.TemporaryDirectory() as tmp:
            output = self.typed_report.output or save_model(self.model, Path(tmp) / "candidate.onnx")
            result = compare_perplexity(LanguageModel(session(self._input), str(self._input)),
                                        LanguageModel(target.session(output), str(output)), ids,
                                        words.get_vocab_size(), window, stride)
        result["max_ratio"] = max_ratio
        result["passed"] = max_ratio is None or result["ratio"] <= max_ratio
        verification = self.typed_report.verification
        verification.perplexity = result
        verification.passed = verification.passed and result["passed"]
        return result


def unused_node_settings(nodes: tuple[NodeSettings, ...], recipe: str,
                         passes: list[ir.passes.PassBase]) -> list[str]:
    """A note for each [[nodes]] key that no pass of the recipe reads (a pass names the keys it reads in
    its ``node_settings``)."""
    read = {key for p in passes for key in getattr(p, "node_settings", ())}
    settings = [f.name for f in fields(NodeSettings) if f.name not in ("match", "quantize")]  # quantize: every recipe
    given = {key for table in nodes for key in settings if getattr(table, key) is not None}
    if not given - read:
        return []
    from qcompile.passes import registry  # every pass module: only to name the readers in the note

    readers = {key: " or ".join(name for name, p in registry().items() if key in getattr(p, "node_settings", ()))
               for key in given - read}
    return [f"[[nodes]] {key}: recipe {recipe} does not run {readers[key]}, so it was not used"
            for key in sorted(readers)]


def _reads_data(passes: list[ir.passes.PassBase]) -> bool:
    return any(getattr(p, "reads_calibration_data", False) for p in passes)


def unused_percentiles(nodes: tuple[NodeSettings, ...], recipe_method: str | None) -> list[str]:
    """A note for each [[nodes]] percentile whose nodes are not calibrated by percentile."""
    return [f"[[nodes]] match {list(table.match)}: percentile = {table.percentile} was not used: these nodes are "
            f"calibrated with {table.calib_method or recipe_method}, not percentile"
            for table in nodes if table.percentile is not None and recipe_method is not None
            and (table.calib_method or recipe_method) != "percentile"]


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


def check_float_types(model: ir.Model, path: Path) -> None:
    """Refuse a model whose matmuls or convolutions compute in a float type other than float32 and
    float16 (which `upcast-float16` turns into float32)."""
    for node in all_nodes(model):
        if node.op_type not in COMPUTE_OPS:
            continue
        dtype = next((v.dtype for v in node.inputs if v is not None and v.dtype is not None
                      and v.dtype.is_floating_point() and v.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16)),
                     None)
        if dtype is not None:
            which = f"{node.op_type} {node.name!r}" if node.name else f"an unnamed {node.op_type}"
            raise UsageError(f"{path}: {which} computes in {dtype.name.lower()}; qcompile "
                             f"quantizes float32 and float16 models: export the model in one of those")


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
    chosen_target = get_target(settings.target)
    chosen = get_recipe(settings.recipe)
    resolved = chosen.resolve_options(settings.options)
    data = CalibrationData(calib, calib_size, seed) if calib else None
    passes = chosen.build(Settings(chosen_target, resolved, tuple(settings.exclude), data, settings.nodes))
    names = {pass_name(p) for p in passes}
    unknown = [d for d in dump_after if d not in names]
    if unknown:
        raise UsageError(f"--dump-after {unknown[0]}: recipe {chosen.name} has no such pass ({', '.join(sorted(names))})")

    reset_peak()
    model = load_model(input_path)
    check_float_types(model, input_path)
    cpu = getattr(resolved, "cpu", None)
    already = check_already_quantized(model, input_path, chosen_target,
                                      vnni_only=cpu is not None and cpu_profile(cpu).choice == "vnni")
    input_nodes = [node.name for node in all_nodes(model)]
    dump = dump_to_folder(Path(dump_dir or "."), input_path.stem, set(dump_after)) if dump_after else None
    records = Pipeline(passes, verify_each=verify_each, dump_after=dump).run(model)
    placement = []
    if getattr(resolved, "placement", None) == "measured" and not chosen_target.qdq_semantics and data is not None:
        def compile_as(placement: str, exclude: tuple[str, ...]):
            again = load_model(input_path)
            settings_again = Settings(chosen_target, replace(resolved, placement=placement),
                                      tuple(settings.exclude) + exclude, data, settings.nodes)
            return again, Pipeline(chosen.build(settings_again), verify_each=verify_each).run(again)

        (model, records), note = choose_placement(input_path, (model, records), compile_as, data, chosen_target)
        placement.append(note)
    reads_data = _reads_data(passes)
    unused_inputs = ([f"recipe {chosen.name} as set up reads no data: --calib {calib} was not used"]
                     if calib and not reads_data else []) + unused_node_settings(settings.nodes, chosen.name, passes)
    unused_inputs += unused_percentiles(settings.nodes, getattr(resolved, "calib_method", None))
    unused_inputs += unmatched_patterns(settings, input_nodes, [node.name for node in all_nodes(model)])
    available = data.samples(model_inputs(model)) if data and calib_size and reads_data else None
    if available is not None and available < calib_size:
        unused_inputs.append(f"--calib-size {calib_size}: {calib} holds {available} samples; all of them were used")
    options = asdict(resolved)
    if "cpu" in options and not chosen_target.cpu_kernels:
        if "cpu" in settings.options:
            cpu_targets = " and ".join(t.name for t in TARGETS.values() if t.cpu_kernels)
            unused_inputs.append(f"option cpu={settings.options['cpu']} was not used: it is for targets {cpu_targets}, "
                                 f"and {chosen_target.name} computes Q/DQ as ONNX defines them")
        del options["cpu"]
    report = Report(
        recipe=chosen.name,
        options=options,
        node_settings=[asdict(table) for table in settings.nodes],
        target=chosen_target.name,
        input=str(input_path),
        size_bytes=SizeBytes(file_bytes(input_path)),
        passes=records,
        layers=[Layer(**row) for row in layer_precisions(model)],
        notes=([already] if already else []) + notes(model) + placement + unused_inputs,
        cpu=asdict(cpu_profile(options["cpu"])) if "cpu" in options else None,
        versions=versions(),
        command=" ".join(sys.argv),
        peak_memory_bytes=peak_bytes(),
    )
    return CompileResult(model, report, input_path)


__all__ = ["compile", "CompileResult", "PassRecord"]
