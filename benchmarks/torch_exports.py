"""qcompile's `w8a8` next to ONNX Runtime's `quantize_static` on graphs as torch's exporters write them.

Real users start from `torch.onnx.export`. For each model of `torch_models.py` and each exporter
(dynamo at torch's default opset and at 18, TorchScript at 17 and 11) the script exports the model
with torch (in Quark's venv, which `int8.py` builds and which has torch and onnxscript), then
quantizes the export on the same calibration data with

* qcompile: `qcompile.compile(export, recipe="w8a8")`, default options, target ort-cpu;
* ONNX Runtime as its documentation describes: `quant_pre_process`, then `quantize_static` (QDQ,
  per-channel, MinMax, QUInt8 activations, QInt8 weights). Where `quant_pre_process`'s symbolic shape
  inference fails on the export, it is run again with `skip_symbolic_shape=True`, and the table says so.

and measures both against the fp32 export: output SQNR, top-1 agreement (MobileNetV2), and ONNX
Runtime CPU latency at batch 1 and 8 as a ratio to fp32 (interleaved rounds, medians).

MobileNetV2 has its real ImageNet weights and image data (`qcompile.models.mobilenetv2`); the UNet
and the YOLO-style network have random weights and smooth random images: they are there for their
operators (LeakyRelu / HardSwish / SiLU after convolutions, ConvTranspose, Resize, Concat, Split).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8 import QUARK_VENV, RESULTS_DIR, THREADS, _sqnr_db, machine_info, machine_slug, quark_venv, say  # noqa: E402

MODELS = {"mobilenetv2": ("dynamo", "dynamo18", "torchscript17", "torchscript11"),
          "unet": ("dynamo", "torchscript17"),
          "yolo": ("dynamo", "torchscript17")}
TORCH_MODELS = Path(__file__).resolve().parent / "torch_models.py"


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Sums of a few random plane waves per channel: images with structure, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    waves = lambda: sum(rng.normal() * np.sin(2 * np.pi * (rng.uniform(0, 6) * xx + rng.uniform(0, 6) * yy)  # noqa: E731
                                                + rng.uniform(0, 6)) for _ in range(5))
    return np.array([[waves() for _ in range(3)] for _ in range(n)], np.float32)


def model_data(name: str, quick: bool) -> tuple[np.ndarray, np.ndarray]:
    if name == "mobilenetv2":
        from qcompile.models import mobilenetv2

        return (mobilenetv2.image_data("calibration", 16 if quick else 64)["pixel_values"],
                mobilenetv2.image_data("evaluation", 16 if quick else 200)["pixel_values"])
    size = {"unet": 64, "yolo": 128}[name]
    return smooth_images(8 if quick else 32, size, 1), smooth_images(8 if quick else 32, size, 2)


def export(torch_python: str, name: str, exporter: str, output: Path) -> None:
    weights = []
    if name == "mobilenetv2":
        from qcompile.models import mobilenetv2

        weights = [str(mobilenetv2.PACKAGE.path())]
    subprocess.run([torch_python, str(TORCH_MODELS), name, exporter, str(output), *weights], check=True,
                   capture_output=True, text=True)


def qcompile_quantize(source: Path, output: Path, calib_path: Path) -> dict:
    import qcompile

    compiled = qcompile.compile(source, recipe="w8a8", calib=str(calib_path))
    compiled.save(output)
    return {"notes": compiled.report["notes"]}


def ort_quantize(source: Path, output: Path, calib_path: Path) -> dict:
    """ONNX Runtime's documented static flow; says how pre-processing went."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = np.load(calib_path)["pixel_values"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            sample = next(self.samples, None)
            return None if sample is None else {"pixel_values": sample}

    pre = output.with_suffix(".pre.onnx")
    how = "quant_pre_process"
    try:
        quant_pre_process(str(source), str(pre))
    except Exception as exc:  # noqa: BLE001 (ORT raises a bare Exception here)
        how = f"quant_pre_process failed ({_one_line(exc, 60)}); again with skip_symbolic_shape=True"
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"preprocess": how}


def _one_line(exc: BaseException, limit: int = 160) -> str:
    if isinstance(exc, subprocess.CalledProcessError) and exc.stderr and exc.stderr.strip():
        return exc.stderr.strip().splitlines()[-1][:limit]
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import qcompile

    session = qcompile.session(path, threads=THREADS)
    return np.concatenate([session.run(None, {"pixel_values": x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def latency(paths: dict[str, Path], x: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per model and batch, the models run in turn in each round (rotating order)."""
    import qcompile

    sessions = {key: qcompile.session(path, threads=THREADS) for key, path in paths.items()}
    result: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for batch in (1, 8):
        feed = {"pixel_values": x[:batch]}
        times: dict[str, list[float]] = {key: [] for key in sessions}
        for key, session in sessions.items():
            session.run(None, feed)
        keys = list(sessions)
        for r in range(rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                until = time.perf_counter() + 0.5
                while time.perf_counter() < until or len(times[key]) < 5 * (r + 1):
                    start = time.perf_counter()
                    sessions[key].run(None, feed)
                    times[key].append(time.perf_counter() - start)
        for key in keys:
            result[key][f"b{batch}"] = 1e3 * statistics.median(times[key])
    return result


def bench(torch_python: str, name: str, exporter: str, calib: np.ndarray, evaluation: np.ndarray, work: Path,
          rounds: int) -> dict:
    """One export, quantized by each tool; a tool that fails gets its error in the row, the other goes on."""
    source, calib_path = work / f"{name}-{exporter}.onnx", work / "calib.npz"
    export(torch_python, name, exporter, source)
    np.savez(calib_path, pixel_values=calib)
    reference = outputs(source, evaluation)
    row, paths = {"model": name, "exporter": exporter}, {"fp32": source}
    for key, quantize in (("qcompile", qcompile_quantize), ("ort", ort_quantize)):
        path = work / f"{name}-{exporter}.{key}.onnx"
        try:
            start = time.perf_counter()
            row[key] = quantize(source, path, calib_path)
            row[key]["seconds"] = time.perf_counter() - start
            candidate = outputs(path, evaluation)
        except Exception as exc:  # noqa: BLE001 (recorded, the run goes on)
            row[key] = {"error": re.sub(r"/\S*/", "", _one_line(exc, 300))}  # file names without their folders
            continue
        row[key]["sqnr_db"] = _sqnr_db(reference, candidate)
        if name == "mobilenetv2":
            row[key]["top1"] = float(np.mean(candidate.argmax(-1) == reference.argmax(-1)))
        paths[key] = path
    times = latency(paths, evaluation, rounds)
    for key in paths.keys() - {"fp32"}:
        row[key]["latency"] = {batch: times[key][batch] / times["fp32"][batch] for batch in ("b1", "b8")}
    row["fp32_ms"] = times["fp32"]
    return row


def markdown(doc: dict) -> str:
    info = doc["machine"]
    lines = [f"# Torch exports: qcompile w8a8 vs ONNX Runtime quantize_static — {doc['date']}", "",
             f"* machine: {info['cpu']}, {info['cores']} cores, VNNI: {info['vnni'] or 'none'}",
             f"* onnxruntime {info['onnxruntime']}, qcompile commit {info['commit']}, exports by torch "
             f"{doc['torch']} (Quark's venv)",
             "* SQNR and top-1 agreement against the fp32 export on the evaluation data; latency: ONNX Runtime "
             "CPU, 2 threads, interleaved rounds, median, as a ratio to the fp32 export", "",
             "| model | exporter | SQNR dB qc / ORT | top-1 qc / ORT | latency b1 qc / ORT | latency b8 qc / ORT "
             "| compile s qc / ORT | failures, ORT pre-processing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | export failed: {r['error']} | | | | | |")
            continue
        tools = [r["qcompile"], r["ort"]]

        def cells(field, fmt):
            return " / ".join("–" if field(t) is None else fmt.format(field(t)) for t in tools)

        failed = [f"{tool} failed: {t['error']}" for tool, t in zip(("qcompile", "ORT"), tools) if "error" in t]
        lines.append(f"| {r['model']} | {r['exporter']} | {cells(lambda t: t.get('sqnr_db'), '{:.1f}')} "
                     f"| {cells(lambda t: t.get('top1'), '{:.3f}')} "
                     f"| {cells(lambda t: t.get('latency', {}).get('b1'), '{:.2f}')} "
                     f"| {cells(lambda t: t.get('latency', {}).get('b8'), '{:.2f}')} "
                     f"| {cells(lambda t: t.get('seconds'), '{:.1f}')} "
                     f"| {'; '.join(failed) or r['ort']['preprocess']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="small data sets, one latency round")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    from qcompile.paths import cache_dir

    venv = quark_venv(cache_dir() / "bench" / QUARK_VENV)
    if "error" in venv:
        say(f"[red]no torch to export with: {venv['error']}[/]")
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcompile-torch-exports-") as tmp:
        for name in args.models.split(","):
            calib, evaluation = model_data(name, args.quick)
            for exporter in MODELS[name]:
                say(f"{name} / {exporter}")
                work = Path(tmp) / f"{name}-{exporter}"
                work.mkdir()
                try:
                    rows.append(bench(venv["python"], name, exporter, calib, evaluation, work, 1 if args.quick else 5))
                except subprocess.CalledProcessError as exc:
                    rows.append({"model": name, "exporter": exporter, "error": _one_line(exc)})
                say(f"  {json.dumps(rows[-1], default=str)[:400]}")
    info = machine_info()
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": info, "torch": venv["versions"]["torch"], "rows": rows,
           "quick": args.quick}
    stem = f"torch-exports-{doc['date']}-{machine_slug(info)}{'-quick' if args.quick else ''}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    (args.results_dir / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
