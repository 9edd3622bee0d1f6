"""The `qcompile` command line (INTERFACE.md). Exit codes: 0 ok, 1 verification failed, 2 bad usage or input."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qcompile import progress
from qcompile.errors import UsageError, VerificationFailed
from qcompile.report.console import print_compile_summary

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, not argparse's usage block, then exit 2 like every usage error."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole_number(minimum: int):
    """An argparse type: a whole number of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {minimum} or more, got {value}")
        return value
    return parse


_count, _seed = _whole_number(1), _whole_number(0)  # samples or rows; a random seed


def _decibels(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of dB, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of dB, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 1.1, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a finite ratio of at least 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompile", description="A quantization compiler for ONNX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    # --debug after the command too; SUPPRESS keeps a subcommand from resetting one given before it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", parents=[debug], help="compile a model with a recipe")
    c.add_argument("input")
    c.add_argument("-o", "--output", required=True)
    group = c.add_mutually_exclusive_group()
    group.add_argument("--recipe")
    group.add_argument("--config", help="a TOML file with recipe, target, options, exclude")
    c.add_argument("--target", help="ort-cpu (default), ort-cuda, tensorrt, portable")
    c.add_argument("--calib", help="calibration data: .npz, a folder of .npz, or 'random'")
    c.add_argument("--calib-size", type=_count)
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="recipe parameter")
    c.add_argument("--exclude", action="append", default=[], metavar="NODE_OR_PATTERN")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, metavar="SIZE_MB")
    budget.add_argument("--max-loss", type=float, metavar="DB")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--html", help="write an HTML report here")
    c.add_argument("--verify", action="store_true", help="compare against the input model")
    c.add_argument("--verify-data", default=None, help="data for --verify (default: --calib, else random)")
    c.add_argument("--verify-size", type=_count, default=None, help="samples used by --verify")
    c.add_argument("--min-sqnr", type=_decibels, help="with --verify: exit 1 if any output's SQNR is lower (dB)")
    c.add_argument("--verify-text", help="with --verify: also both models' perplexity on this text (decoder LMs; "
                                         "needs --tokenizer)")
    c.add_argument("--tokenizer", help="the model's tokenizer.json, for --verify-text")
    c.add_argument("--max-perplexity-ratio", type=_ratio, metavar="R",
                   help="with --verify-text: exit 1 if the compiled model's perplexity is above R times the input's")
    c.add_argument("--verify-each", action="store_true", help="run the ONNX checker and invariants after every pass")
    c.add_argument("--dump-after", action="append", default=[], metavar="PASS")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--quiet", action="store_true")

    i = sub.add_parser("inspect", parents=[debug], help="op histogram, precision per layer, size breakdown")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.add_argument("--target", help="also check what ort-cpu, ort-cuda, tensorrt or portable would reject "
                                    "(exit 1 if anything)")

    d = sub.add_parser("diff", parents=[debug], help="what changed between two models, and which pass did it")
    d.add_argument("before")
    d.add_argument("after")
    d.add_argument("--json", action="store_true")

    e = sub.add_parser("eval", parents=[debug],
                       help="per-output SQNR / cosine / max-abs and latency of a candidate vs a reference; with "
                            "--text, perplexity of both (decoder LMs)")
    e.add_argument("reference")
    e.add_argument("candidate")
    e.add_argument("--data", help="samples to run both models on (.npz, a folder of them, or random)")
    e.add_argument("--text", help="a UTF-8 text file: both models' perplexity on it (needs --tokenizer)")
    e.add_argument("--tokenizer", help="the models' tokenizer.json (Hugging Face tokenizers format)")
    e.add_argument("--window", type=_whole_number(2), default=512, help="tokens per window (--text; 512)")
    e.add_argument("--stride", type=_count, default=256,
                   help="tokens the window moves by; the rest is context (--text; 256)")
    e.add_argument("--size", type=_count, default=None, help="samples to use")
    e.add_argument("--layers", type=_count, default=10, help="how many of the worst quantized tensors to list")
    e.add_argument("--target", default="ort-cpu",
                   help="the target CANDIDATE was compiled for: tensorrt and ort-cuda models run with Q/DQ "
                        "computed as ONNX defines them, not on ONNX Runtime's CPU integer kernels")
    e.add_argument("--json", action="store_true")

    r = sub.add_parser("recipes", parents=[debug], help="list recipes and their options; NAME: its passes and options")
    r.add_argument("name", nargs="?", help="a recipe: show its pass list and typed options")
    sub.add_parser("passes", parents=[debug], help="list passes")
    k = sub.add_parser("kernels", parents=[debug], help="build / locate / self-test the custom-op library")
    k.add_argument("action", choices=("build", "path", "check"),
                   help="build: compile it into the cache dir (downloads ONNX Runtime's headers once, ~150 MB, "
                        "unless $QCOMPILE_ORT_INCLUDE names them); path: where it is; check: its ops against their "
                        "numpy references on this CPU")
    k.add_argument("--force", action="store_true", help="build: rebuild even if built")
    return parser


def _parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def _cmd_compile(args) -> int:
    import qcompile
    from qcompile.io import check_not_input, external_data_path, load_model

    if args.budget is not None or args.max_loss is not None:
        raise UsageError("--budget / --max-loss need the `auto` mixed-precision recipe, which is not built yet")
    if args.html:
        raise UsageError("--html reports are not built yet; use --report REPORT.json")
    for flag, value in (("--min-sqnr", args.min_sqnr), ("--verify-data", args.verify_data),
                        ("--verify-size", args.verify_size), ("--verify-text", args.verify_text)):
        if value is not None and not args.verify:
            raise UsageError(f"{flag} needs --verify")
    if (args.verify_text is None) != (args.tokenizer is None):
        raise UsageError("--verify-text and --tokenizer go together")
    if args.max_perplexity_ratio is not None and args.verify_text is None:
        raise UsageError("--max-perplexity-ratio needs --verify-text")
    output = Path(args.output)
    load_model(args.input)  # one clear line for a bad file, before the paths are checked against it
    check_not_input(output, Path(args.input), with_data=True)
    if args.report:
        report = Path(args.report)
        check_not_input(report, Path(args.input))
        if report.resolve() in (output.resolve(), external_data_path(output).resolve()):
            raise UsageError(f"--report {report}: is where the compiled model goes")
        _check_writable(report)
    console = None if args.quiet else err
    with progress.display(console) if console else _nothing():
        result = qcompile.compile(
            args.input, recipe=args.recipe, target=args.target, calib=args.calib, calib_size=args.calib_size,
            options=_parse_options(args.option), exclude=tuple(args.exclude), config=args.config,
            verify_each=args.verify_each, dump_after=tuple(args.dump_after), dump_dir=output.parent, seed=args.seed,
        )
        result.save(output)
        if args.verify:
            data = args.verify_data or args.calib or "random"
            try:
                result.verify(data, limit=args.verify_size, seed=args.seed, min_sqnr=args.min_sqnr)
                if args.verify_text is not None:
                    result.verify_perplexity(args.verify_text, args.tokenizer, args.max_perplexity_ratio)
            except BaseException:  # the command fails: leave no output behind
                _discard(output)
                raise
    report = result.typed_report
    if args.report:
        _write_json(Path(args.report), report.to_json())
    if not args.quiet:
        print_compile_summary(report, out)
    verification = report.verification
    perplexity = verification.perplexity if verification else None
    if perplexity is not None and not perplexity["passed"]:
        raise VerificationFailed(f"perplexity {perplexity['candidate']:.3f} against the input model's "
                                 f"{perplexity['reference']:.3f} ({perplexity['ratio']:.3f}x), above "
                                 f"--max-perplexity-ratio {args.max_perplexity_ratio}")
    if verification and not verification.passed:
        worst = min(verification.outputs, key=lambda o: o.sqnr_db)
        culprit = verification.blame
        hint = f"; the layer adding the most error is {_remedy(culprit)}" if culprit else ""
        raise VerificationFailed(
            f"output {worst.name!r} has SQNR {worst.sqnr_db:.1f} dB, below --min-sqnr {args.min_sqnr}{hint}"
        )
    return 0


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _discard(model: Path) -> None:
    """Remove a model this run wrote, with its external data."""
    from qcompile.io import external_data_path

    for path in (model, external_data_path(model)):
        path.unlink(missing_ok=True)


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{path}: cannot write there (folder {parent} missing or not writable)")


def _write_json(path: Path, data: dict) -> None:
    _check_writable(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent or ".", delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=2, default=str)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # as an ordinary file, not the temporary file's 0600
    os.replace(f.name, path)


def _cmd_inspect(args) -> int:
    from qcompile.inspection import describe
    from qcompile.io import load_model
    from qcompile.target_check import target_problems
    from qcompile.targets import get_target

    target = get_target(args.target) if args.target is not None else None
    model = load_model(args.model)
    info = describe(model)
    problems = target_problems(model, target) if target else []
    if args.target:
        info["target"] = {"name": args.target, "problems": problems}
    if args.json:
        out.print_json(json.dumps(info))
        return 1 if problems else 0
    out.print(f"[bold]{escape(args.model)}[/]  IR {info['ir_version']}, opsets "
              + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()) + f", {info['nodes']} nodes")
    if info["custom_op_library"]:
        out.print(f"needs qcompile's custom-op library ({escape(info['custom_op_library'])}): build it with "
                  f"`qcompile kernels build`; qcompile.session() registers it", soft_wrap=True)
    io_table = Table("", "name", "type")
    for kind in ("inputs", "outputs"):
        for name, text in info[kind].items():
            io_table.add_row(kind[:-1], escape(name), escape(text))
    out.print(io_table)
    ops = Table("op", "count")
    for op, n in info["op_histogram"].items():
        ops.add_row(op, str(n))
    out.print(ops)
    sizes = Table("initializer dtype", "bytes")
    for dtype, n in info["initializer_bytes"].items():
        sizes.add_row(dtype, f"{n:,}")
    out.print(sizes)
    precisions = Table("layer", "op", "precision")
    for layer in info["layers"]:
        precisions.add_row(escape(layer["name"]), layer["op_type"], layer["precision"])
    out.print(precisions)
    if args.target:
        out.print(f"target {args.target}: " + (f"{len(problems)} problem(s)" if problems else "no problems found"))
        for problem in problems:
            out.print(f"  {escape(problem)}", soft_wrap=True)
    return 1 if problems else 0


def _cmd_diff(args) -> int:
    from qcompile.inspection import diff
    from qcompile.io import load_model

    result = diff(load_model(args.before), load_model(args.after))
    if args.json:
        out.print_json(json.dumps(result))
        return 0
    out.print(f"{len(result['added'])} nodes added, {len(result['removed'])} removed, "
              f"{len(result['changed'])} changed")
    by_pass = Table("pass", "nodes added or changed")
    for name, n in result["by_pass"].items():
        by_pass.add_row(name, str(n))
    out.print(by_pass)
    table = Table("", "node", "op", "pass")
    for r in result["removed"]:
        table.add_row("[red]-[/]", escape(r["name"]), r["op_type"], "")
    for r in result["added"]:
        table.add_row("[green]+[/]", escape(r["name"]), r["op_type"], r["created_by"])
    for r in result["changed"]:
        op = r["op_type"] if r["was"] == r["op_type"] else f"{r['was']} -> {r['op_type']}"
        table.add_row("[yellow]~[/]", escape(r["name"]), op, r["changed_by"])
    out.print(table)
    return 0


def _cmd_eval(args) -> int:
    if args.text is not None or args.tokenizer is not None:
        return _eval_perplexity(args)
    if args.data is None:
        raise UsageError("eval needs --data DATA, or --text FILE --tokenizer tokenizer.json")
    from qcompile.data import model_inputs
    from qcompile.io import load_model
    from qcompile.target_check import checked_on
    from qcompile.targets import get_target
    from qcompile.verify import MIN_BLAME_DROP_DB, blame, compare_models, layer_errors

    candidate = load_model(args.candidate)  # one clear line for a bad file, before ONNX Runtime sees it
    inputs = model_inputs(load_model(args.reference))
    target = get_target(args.target)
    with progress.display(err):
        result = compare_models(args.reference, args.candidate, args.data, inputs, target, args.size)
        result["layers"] = layer_errors(args.reference, args.candidate, args.data, inputs, target, args.size)
    result["runtime"] = checked_on(candidate, target)
    if args.json:
        out.print_json(json.dumps(result))
        return 0
    table = Table("output", "SQNR dB", "cosine", "max |err|", "same argmax (last axis)")
    for o in result["outputs"]:
        agreement = "-" if o["argmax_agreement"] is None else f"{o['argmax_agreement']:.2%}"
        table.add_row(escape(o["name"]), f"{o['sqnr_db']:.2f}", f"{o['cosine']:.5f}", f"{o['max_abs']:.4g}", agreement)
    out.print(table)
    for lat in result.get("latency_ms", ()):
        out.print(f"latency at batch {lat['batch']}: reference {lat['reference']:.2f} ms, candidate "
                  f"{lat['candidate']:.2f} ms ({lat['ratio']:.2f}x), median of {lat['runs']} interleaved runs")
    if "latency_note" in result:
        out.print(f"latency: {result['latency_note']}")
    out.print(f"checked on {result['runtime']}")
    if result["layers"]:
        layers = Table("quantized tensor", "producer", "SQNR dB", "added by this layer dB", "cosine",
                       "beyond its grid", title=f"worst {min(args.layers, len(result['layers']))} of "
                                                f"{len(result['layers'])} quantized tensors")
        for row in result["layers"][: args.layers]:
            layers.add_row(escape(row["name"]), escape(f"{row['layer']} ({row['op_type']})"), f"{row['sqnr_db']:.2f}",
                           f"{row['sqnr_drop_db']:.2f}", f"{row['cosine']:.5f}", _overflow(row) or "-")
        out.print(layers)
        culprit = blame(result["layers"])
        out.print(f"the layer that adds the most error: {escape(_remedy(culprit))}" if culprit else
                  f"no quantized tensor loses {MIN_BLAME_DROP_DB} dB or more against its inputs: the error arises "
                  f"where no quantized tensor is measured (weights of layers whose output stays float)")
    return 0


def _eval_perplexity(args) -> int:
    from qcompile.io import load_model
    from qcompile.perplexity import LanguageModel, compare_perplexity, load_tokenizer, token_ids
    from qcompile.session import session
    from qcompile.targets import get_target

    if args.text is None or args.tokenizer is None:
        raise UsageError("perplexity needs both --text FILE and --tokenizer tokenizer.json")
    if args.data is not None:
        raise UsageError("--data and --text: give one (outputs on samples, or perplexity on a text)")
    for path in (args.reference, args.candidate):
        load_model(path)  # one clear line for a bad file, before ONNX Runtime sees it
    tokenizer = load_tokenizer(args.tokenizer)
    ids = token_ids(args.text, tokenizer)
    reference = LanguageModel(session(args.reference), args.reference)
    candidate = LanguageModel(get_target(args.target).session(args.candidate), args.candidate)
    with progress.display(err):
        result = compare_perplexity(reference, candidate, ids, tokenizer.get_vocab_size(), args.window, args.stride)
    if args.json:
        out.print_json(json.dumps({"perplexity": result}))
        return 0
    logits = result["logits"]
    out.print(f"perplexity on {escape(args.text)} ({result['predicted']} tokens predicted, windows of "
              f"{result['window']} moved by {result['stride']}): reference {result['reference']:.3f}, candidate "
              f"{result['candidate']:.3f} ({result['ratio']:.3f}x)")
    out.print(f"logits: SQNR {logits['sqnr_db']:.2f} dB, cosine {logits['cosine']:.5f}, same top token "
              f"{logits['argmax_agreement']:.2%}")
    return 0


def _overflow(row: dict) -> str:
    """'0.70% (to 8.8x its end)' for a tensor whose calibrated grid clips the data; '' if none does."""
    if not row.get("beyond_grid"):
        return ""
    return f"{100 * row['beyond_grid']:.2g}% (to {row['peak_over_grid']:.1f}x its end)"


def _remedy(row: dict) -> str:
    """The layer behind a quantized tensor's error, and the ways out: at the nodes that read the tensor
    quantized (excluding its producer would leave its output quantized for them), or, where its grid
    clips much of the data, calibration data that covers such inputs."""
    readers = " ".join(f"--exclude '{reader}'" for reader in row.get("readers", ())) or "--exclude on its readers"
    clipped = (f"; {_overflow(row)} of its values lie beyond its calibrated grid: calibrate on data like these "
               f"inputs" if (row.get("beyond_grid") or 0) >= CLIPPED_HINT else "")
    return (f"{row['layer']} ({row['op_type']}, -{row['sqnr_drop_db']:.1f} dB, tensor {row['name']}): try {readers}, "
            f"or (w8a8) activation_bits = 16 for those nodes ([[nodes]] in a --config file){clipped}")


# The fraction of a tensor's values clipped by its grid from which the hint names calibration data.
CLIPPED_HINT = 1e-3


def _cmd_recipes(args) -> int:
    from qcompile.recipes import all_recipes, get_recipe
    from qcompile.recipes.base import option_help

    if args.name:
        return _show_recipe(get_recipe(args.name))
    table = Table("recipe", "what it does", "options (default)", "status")
    for recipe in all_recipes():
        options = ", ".join(f"{k}={str(default).lower()}" for k, (default, _) in option_help(recipe.options).items())
        table.add_row(recipe.name, recipe.summary, options or "-", "ready" if recipe.build else "planned")
    out.print(table)
    return 0


def _show_recipe(recipe) -> int:
    """A recipe's typed options and the passes it runs with its defaults (target ort-cpu, calibration data given)."""
    from qcompile.calibration import CalibrationData
    from qcompile.pipeline import pass_name
    from qcompile.recipes import Settings
    from qcompile.recipes.base import option_help

    out.print(f"[bold]{recipe.name}[/]: {escape(recipe.summary)}")
    options = Table("option", "default", "what it does", title=f"options ({recipe.options.__name__})")
    for key, (default, help_text) in option_help(recipe.options).items():
        options.add_row(key, str(default).lower(), escape(help_text))
    out.print(options)
    passes = Table("#", "pass", "options", title="passes (defaults, target ort-cpu, --calib DATA)")
    settings = Settings(options=recipe.resolve_options({}), calib=CalibrationData("DATA"))
    for i, p in enumerate(recipe.build(settings), 1):
        passes.add_row(str(i), pass_name(p), escape(repr(p.options)) if hasattr(p, "options") else "")
    out.print(passes)
    return 0


def _cmd_passes(args) -> int:
    from qcompile.passes import registry, summary

    table = Table("pass", "what it does", "module")
    for name, pass_type in registry().items():
        table.add_row(name, summary(pass_type), pass_type.__module__.removeprefix("qcompile.passes."))
    out.print(table)
    return 0


def _cmd_kernels(args) -> int:
    from qcompile import kernels

    if args.action == "build":
        with err.status("building qcompile's custom-op library (cmake)"):
            path = kernels.build(force=args.force)
        out.print(str(path), soft_wrap=True)
        return 0
    if args.action == "path":
        out.print(str(kernels.require_library()), soft_wrap=True)
        return 0
    results = kernels.check()
    table = Table("case", "kernel", "max error (relative)", "")
    for result in results:
        table.add_row(result.case, result.isa, f"{result.max_error:.1e}", "ok" if result.ok else "[red]FAILED[/]")
    out.print(table)
    failed = sum(not r.ok for r in results)
    out.print(f"{len(results) - failed} of {len(results)} passed (tolerance {results[0].tolerance:.0e})")
    return 1 if failed else 0


COMMANDS = {"compile": _cmd_compile, "inspect": _cmd_inspect, "diff": _cmd_diff, "eval": _cmd_eval,
            "recipes": _cmd_recipes, "passes": _cmd_passes, "kernels": _cmd_kernels}


# Output that goes to a file or a pipe is not wrapped to 80 columns: names stay whole for scripts and logs.
UNWRAPPED_WIDTH = 100_000


def main(argv: list[str] | None = None) -> int:
    for console in (out, err):
        console.width = None if console.is_terminal else UNWRAPPED_WIDTH
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if args.debug:
            raise
        err.print(f"qcompile: error: {exc}", markup=False, soft_wrap=True)
        return 2
    except VerificationFailed as exc:
        err.print(f"qcompile: verification failed: {exc}", markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("qcompile: interrupted; nothing was written")
        return 130
    except Exception as exc:  # a bug of ours: one line, the traceback behind --debug
        if args.debug:
            raise
        err.print(f"qcompile: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)",
                  markup=False, soft_wrap=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
