"""Choose a `w8a8` default on held-apart data, never on the zoo's evaluation data.

For each zoo model: its calibration data (made by `zoo.py`) split in two halves; qcompile `w8a8` compiled
on the first half with each value of one option (`placement=integer`, so that only the option changes
what is quantized), and measured with `qcompile eval` on the second half: the worst output's SQNR.
The table gives each value's SQNR per model and its median gain over the first value.

Results: `benchmarks/results/holdout-<option>-<date>-<machine>.{md,json}`. Run nothing else heavy at the
same time.

    .venv/bin/python benchmarks/holdout.py --option headroom --values 1.0,1.1,1.25,1.5
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402  (the manifest, the model cache and the data of the zoo)


def split_calibration(model: dict, folder: Path) -> tuple[Path, Path]:
    """The zoo's calibration data of ``model`` in two halves: (calibrate on, measure on)."""
    run_folder = zoo.cache_dir() / "runs" / model["id"]
    calibration = run_folder / "calibration.npz"
    if not calibration.exists():
        run_folder.mkdir(parents=True, exist_ok=True)
        zoo.make_data(model, zoo.fetch(model), run_folder)
    arrays = dict(np.load(calibration))
    half = len(next(iter(arrays.values()))) // 2
    first, second = folder / "first.npz", folder / "second.npz"
    np.savez(first, **{k: v[:half] for k, v in arrays.items()})
    np.savez(second, **{k: v[half:] for k, v in arrays.items()})
    return first, second


def measure(model: dict, option: str, values: list[str], timeout: float) -> dict[str, float | str]:
    """Per value: the SQNR on the held-apart half, or the line the compile or evaluation failed with."""
    path = zoo.fetch(model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        first, second = split_calibration(model, Path(tmp))
        output = Path(tmp) / "compiled.onnx"
        for value in values:
            code, line, _, _ = zoo.run([zoo.QCOMPILE, "compile", str(path), "-o", str(output), "--recipe", "w8a8",
                                        "--calib", str(first), "--quiet", "--option", "placement=integer",
                                        "--option", f"{option}={value}"], timeout)
            evaluation = zoo._evaluate(path, output, second, timeout) if code == 0 else {"message": line[:160]}
            results[value] = evaluation.get("sqnr_db", evaluation.get("message"))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--option", required=True, help="a w8a8 option key")
    parser.add_argument("--values", required=True, help="comma-separated values; the first is the baseline")
    parser.add_argument("--models", help="comma-separated zoo ids (default: every model of the manifest)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--results-dir", type=Path, default=zoo.RESULTS_DIR)
    args = parser.parse_args()
    values = args.values.split(",")
    models = zoo.chosen_models(parser, args.models)
    rows = []
    for model in models:
        print(f"{datetime.datetime.now():%H:%M:%S} {model['id']}", flush=True)
        rows.append({"id": model["id"], "sqnr_db": measure(model, args.option, values, args.timeout)})
        print(f"  {rows[-1]['sqnr_db']}", flush=True)
    write_results(rows, args.option, values, args.results_dir)
    return 0


def median_gain(rows: list[dict], baseline: str, value: str) -> float | None:
    gains = [row["sqnr_db"][value] - row["sqnr_db"][baseline] for row in rows
             if all(isinstance(row["sqnr_db"][v], float) for v in (baseline, value))]
    return statistics.median(gains) if gains else None


def write_results(rows: list[dict], option: str, values: list[str], folder: Path) -> None:
    model_name, vnni = zoo.machine()
    stem = f"holdout-{option}-{zoo.results_stem().removeprefix('zoo-')}"
    commit = zoo.qcompile_commit()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps({"commit": commit, "machine": model_name, "vnni": vnni,
                                                     "option": option, "values": values, "rows": rows}, indent=1))
    lines = [f"# w8a8 `{option}` on held-apart calibration data — {datetime.date.today()}", "",
             f"* machine: {model_name}, {vnni}; qcompile commit {commit}",
             "* compiled on the first half of each zoo model's calibration data (placement=integer), SQNR dB of the "
             "worst output on the second half", "",
             "| model | " + " | ".join(f"{option}={v}" for v in values) + " |",
             "|---|" + "---|" * len(values)]
    for row in rows:
        cells = [f"{s:.1f}" if isinstance(s, float) else f"failed: {s}" for s in row["sqnr_db"].values()]
        lines.append(f"| {row['id']} | " + " | ".join(cells) + " |")
    gains = ["–" if (g := median_gain(rows, values[0], v)) is None else f"{g:+.1f}" for v in values]
    lines.append("| median gain over the first | " + " | ".join(gains) + " |")
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / stem}.{{md,json}}")


if __name__ == "__main__":
    sys.exit(main())
