"""qcompile's `w8a8` next to ONNX Runtime's `quantize_static` on graphs as torch's exporters write them.

Real users start from `torch.onnx.export`. For each model of `torch_models.py` and each exporter
(dynamo at torch's default opset and at 18, TorchScript at 17 and 11) the script exports the model
with torch (in Quark's venv, which `int8.py` builds and which has torch and onnxscript), then
quantizes the export on the same calibration data with

* qcompile: `qcompile.compile(export, recipe="w8a8")`, default options, target ort-cpu;
* ONNX Runtime as its documentation describes: `quant_pre_process`, then `quantize_static` (QDQ,
  per-channel, MinMax, QUInt8 activations, QInt8 weights). Where `quant_pre_process`'s symbolic shape
  inference fails on the export, it is run again with `skip_symbolic_shape=True`, and the table says so.

and measures both against the fp32 export: MobileNetV2 top-1 agreement, MiniLM sentence-embedding
cosine, SmolLM2 perplexity, output SQNR for the image models, and ONNX Runtime CPU latency as a ratio
to fp32 (interleaved rounds, medians).

MobileNetV2, MiniLM and SmolLM2 have their real weights (from the packages `qcompile.models` reads)
and the `int8.py` data; the UNet and the YOLO-style network have random weights and smooth random
images: they are there for their operators (LeakyRelu / HardSwish / SiLU after convolutions,
ConvTranspose, Resize, Concat, Split).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
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
from int8 import (QUARK_VENV, RESULTS_DIR, THREADS, _cosines, _sqnr_db, machine_info, machine_slug,  # noqa: E402
                  quark_venv, say)

MODELS = {"mobilenetv2": ("dynamo", "dynamo18", "torchscript17", "torchscript11"),
          "minilm": ("dynamo", "torchscript17"),
          "smollm2": ("dynamo", "torchscript17"),
          "unet": ("dynamo", "torchscript17"),
          "yolo": ("dynamo", "torchscript17")}
TORCH_MODELS = Path(__file__).resolve().parent / "torch_models.py"
LATENCY_SEQ = 128  # SmolLM2's latency: one window of this many tokens


def smooth_images(n: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Sums of a few random plane waves per channel: images with structure, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    waves = lambda: sum(rng.normal() * np.sin(2 * np.pi * (rng.uniform(0, 6) * xx + rng.uniform(0, 6) * yy)  # noqa: E731
                                                + rng.uniform(0, 6)) for _ in range(5))
    return {"pixel_values": np.array([[waves() for _ in range(3)] for _ in range(n)], np.float32)}


def model_data(name: str, quick: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Calibration and evaluation data (the int8.py sets for the real models, fewer evaluation samples)."""
    from qcompile.models import minilm, mobilenetv2, smollm2

    if name == "mobilenetv2":
        return mobilenetv2.image_data("calibration", 16 if quick else 64), \
            mobilenetv2.image_data("evaluation", 16 if quick else 200)
    if name == "minilm":
        return minilm.sentence_data("calibration", 16 if quick else 64), \
            minilm.sentence_data("evaluation", 16 if quick else 96)
    if name == "smollm2":
        return smollm2.text_windows("calibration", 4 if quick else 16, 128), \
            smollm2.text_windows("evaluation", 2 if quick else 8, 256)
    size = {"unet": 64, "yolo": 128}[name]
    return smooth_images(8 if quick else 32, size, 1), smooth_images(8 if quick else 32, size, 2)


def _minilm_weights() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from qcompile.models import minilm

    renames = [(r"^embeddings\.word_embeddings", "word"), (r"^embeddings\.position_embeddings", "position"),
               (r"^embeddings\.token_type_embeddings", "token_type"), (r"^embeddings\.LayerNorm", "norm"),
               (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"layers.\1."),
               (r"^encoder\.layer\.(\d+)\.attention\.output\.dense", r"layers.\1.attn_out"),
               (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", r"layers.\1.attn_norm"),
               (r"^encoder\.layer\.(\d+)\.intermediate\.dense", r"layers.\1.ffn_in"),
               (r"^encoder\.layer\.(\d+)\.output\.dense", r"layers.\1.ffn_out"),
               (r"^encoder\.layer\.(\d+)\.output\.LayerNorm", r"layers.\1.ffn_norm")]
    weights = {}
    for name, array in load_file(str(minilm.PACKAGE.path())).items():
        for pattern, replacement in renames:
            if re.match(pattern, name):
                weights[re.sub(pattern, replacement, name)] = array
    c = minilm.config()
    weights["config"] = np.array(json.dumps({
        "hidden": c.hidden, "heads": c.heads, "layers": c.layers, "intermediate": c.intermediate, "eps": c.eps,
        "max_positions": c.max_positions, "vocab": len(weights["word.weight"]), "types": len(weights["token_type.weight"])}))
    return weights


def _smollm2_weights() -> dict[str, np.ndarray]:
    from qcompile.models import smollm2

    c = smollm2.config()
    load = smollm2.gguf_weights(c)
    renames = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_norm", "self_attn.": "", "mlp.": ""}
    weights = {}
    for hf in smollm2.GGUF_NAMES:
        for i in range(c.layers) if "{i}" in hf else [None]:
            name = hf.format(i=i)
            ours = name
            for old, new in renames.items():
                ours = ours.replace(old, new)
            weights[ours] = load(name)
    weights["config"] = np.array(json.dumps({
        "vocab": c.vocab, "hidden": c.hidden, "intermediate": c.intermediate, "layers": c.layers, "heads": c.heads,
        "kv_heads": c.kv_heads, "eps": c.eps, "rope_theta": c.rope_theta}))
    return weights


def weights_file(name: str, folder: Path) -> list[str]:
    """The real weights for torch_models.py: the .pth as it is, the others as an .npz in ``folder``."""
    from qcompile.models import mobilenetv2

    if name == "mobilenetv2":
        return [str(mobilenetv2.PACKAGE.path())]
    if name not in ("minilm", "smollm2"):
        return []
    path = folder / f"{name}-weights.npz"
    if not path.exists():
        np.savez(path, **(_minilm_weights() if name == "minilm" else _smollm2_weights()))
    return [str(path)]


def export(torch_python: str, name: str, exporter: str, output: Path) -> None:
    subprocess.run([torch_python, str(TORCH_MODELS), name, exporter, str(output), *weights_file(name, output.parent.parent)],
                   check=True, capture_output=True, text=True)


def qcompile_quantize(source: Path, output: Path, calib_path: Path) -> dict:
    import qcompile

    compiled = qcompile.compile(source, recipe="w8a8", calib=str(calib_path))
    compiled.save(output)
    return {"notes": compiled.report["notes"]}


def ort_quantize(source: Path, output: Path, calib_path: Path) -> dict:
    """ONNX Runtime's documented static flow; says how pre-processing went."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with np.load(calib_path) as data:
        calib = {k: data[k] for k in data.files}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = _batches(calib, 1)

        def get_next(self):
            return next(self.samples, None)

    pre = output.with_suffix(".pre.onnx")
    how = "quant_pre_process"
    with contextlib.chdir(output.parent):  # ORT leaves uuid-named external data files in the working directory
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


def _batches(data: dict[str, np.ndarray], size: int):
    count = len(next(iter(data.values())))
    for i in range(0, count, size):
        yield {k: v[i:i + size] for k, v in data.items()}


def scores(name: str, path: Path, evaluation: dict[str, np.ndarray], reference: np.ndarray | None) -> tuple[dict, np.ndarray | None]:
    """The model's accuracy numbers against ``reference`` (the fp32 export's outputs), and its outputs."""
    import qcompile
    from qcompile.models import smollm2

    session = qcompile.session(path, threads=THREADS)
    if name == "smollm2":  # one window at a time: the logits of all windows are hundreds of MB
        return {"perplexity": smollm2.perplexity(lambda w: session.run(None, {"input_ids": w})[0],
                                                 evaluation["input_ids"])}, None
    out = np.concatenate([session.run(None, feed)[0] for feed in _batches(evaluation, 8)])
    if reference is None:
        return {}, out
    if name == "minilm":  # sentence embeddings: mean over the attended tokens
        mask = evaluation["attention_mask"][..., None].astype(np.float64)
        pooled = [(o * mask).sum(1) / mask.sum(1) for o in (reference, out)]
        return {"cosine": float(_cosines(*pooled).mean())}, out
    result = {"sqnr_db": _sqnr_db(reference, out)}
    if name == "mobilenetv2":
        result["top1"] = float(np.mean(out.argmax(-1) == reference.argmax(-1)))
    return result, out


def latency_feeds(name: str, evaluation: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    if name == "smollm2":
        return {"b1": {"input_ids": evaluation["input_ids"][:1, :LATENCY_SEQ]}}
    return {f"b{b}": {k: v[:b] for k, v in evaluation.items()} for b in (1, 8)}


def latency(paths: dict[str, Path], feeds: dict[str, dict[str, np.ndarray]], rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per model and batch, the models run in turn in each round (rotating order)."""
    import qcompile

    sessions = {key: qcompile.session(path, threads=THREADS) for key, path in paths.items()}
    result: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for batch, feed in feeds.items():
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
            result[key][batch] = 1e3 * statistics.median(times[key])
    return result


def bench(torch_python: str, name: str, exporter: str, calib: dict[str, np.ndarray],
          evaluation: dict[str, np.ndarray], work: Path, rounds: int) -> dict:
    """One export, quantized by each tool; a tool that fails gets its error in the row, the other goes on."""
    source, calib_path = work / f"{name}-{exporter}.onnx", work / "calib.npz"
    export(torch_python, name, exporter, source)
    np.savez(calib_path, **calib)
    row, paths = {"model": name, "exporter": exporter}, {"fp32": source}
    row["fp32"], reference = scores(name, source, evaluation, None)
    for key, quantize in (("qcompile", qcompile_quantize), ("ort", ort_quantize)):
        path = work / f"{name}-{exporter}.{key}.onnx"
        try:
            start = time.perf_counter()
            row[key] = quantize(source, path, calib_path)
            row[key]["seconds"] = time.perf_counter() - start
            row[key].update(scores(name, path, evaluation, reference)[0])
        except Exception as exc:  # noqa: BLE001 (recorded, the run goes on)
            row[key] = {"error": re.sub(r"/\S*/", "", _one_line(exc, 420))}  # file names without their folders
            continue
        paths[key] = path
    times = latency(paths, latency_feeds(name, evaluation), rounds)
    for key in paths.keys() - {"fp32"}:
        row[key]["latency"] = {batch: ms / times["fp32"][batch] for batch, ms in times[key].items()}
    row["fp32"]["latency_ms"] = times["fp32"]
    return row


METRICS = {"mobilenetv2": ("top1", "top-1 agreement", "{:.3f}"), "minilm": ("cosine", "mean cosine", "{:.4f}"),
           "smollm2": ("perplexity", "perplexity", "{:.2f}")}


def markdown(doc: dict) -> str:
    info = doc["machine"]
    lines = [f"# Torch exports: qcompile w8a8 vs ONNX Runtime quantize_static — {doc['date']}", "",
             f"* machine: {info['cpu']}, {info['cores']} cores, VNNI: {', '.join(info['vnni']) or 'none'}",
             f"* onnxruntime {info['onnxruntime']}, qcompile commit {info['commit']}, exports by torch "
             f"{doc['torch']} (Quark's venv)",
             "* accuracy against the fp32 export on the evaluation data (MobileNetV2 top-1 agreement, MiniLM mean "
             "sentence-embedding cosine, SmolLM2 perplexity with the fp32 export's in brackets, UNet / YOLO output "
             "SQNR); latency: ONNX Runtime CPU, 2 threads, interleaved rounds, median, as a ratio to the fp32 "
             "export (SmolLM2: batch 1 x 128 tokens)", "",
             "| model | exporter | accuracy qc / ORT | SQNR dB qc / ORT | latency b1 qc / ORT | latency b8 qc / ORT "
             "| compile s qc / ORT | failures, ORT pre-processing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | export failed: {r['error']} | | | | | |")
            continue
        tools = [r["qcompile"], r["ort"]]

        def cells(field, fmt):
            return " / ".join("–" if field(t) is None else fmt.format(field(t)) for t in tools)

        key, label, fmt = METRICS.get(r["model"], (None, "", ""))
        accuracy = "–" if key is None else f"{label} {cells(lambda t: t.get(key), fmt)}"
        if key == "perplexity":
            accuracy += f" ({fmt.format(r['fp32']['perplexity'])})"
        failed = [f"{tool} failed: {t['error']}" for tool, t in zip(("qcompile", "ORT"), tools) if "error" in t]
        lines.append(f"| {r['model']} | {r['exporter']} | {accuracy} | {cells(lambda t: t.get('sqnr_db'), '{:.1f}')} "
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
