#!/usr/bin/env python
"""Large-model benchmark: every INT4 recipe on the 1B-parameter synthetic LLaMA (`llama-1b`: 4.1 GB of fp32
external data), each compile in a process of its own, next to ONNX Runtime's `MatMulNBitsQuantizer` on the same
model in the same run.

    .venv/bin/python benchmarks/large_model.py [--configs PATTERN,...] [--calib-samples 8]

Per configuration: compile wall time, peak memory as the kernel counts the process (its maximum resident
set after the compile and save, mapped files included) and as qcompile's report gives it, size on disk, and
the compiled logits against fp32 on other random tokens (mean cosine, top-1 agreement). The weights are random, so the logits check that the
compile is right, not how good a recipe is (`int4.py` scores recipes on real models). Results:
``benchmarks/results/large-model-<date>-<machine>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import int8

CONFIGS = {  # name: (tool, recipe or ORT algorithm, options)
    "qcompile w4a16-rtn": ("qcompile", "w4a16-rtn", {}),
    "qcompile w4a16-rtn embedding_bits=4": ("qcompile", "w4a16-rtn", {"embedding_bits": "4"}),
    "qcompile w4a16-hqq": ("qcompile", "w4a16-hqq", {}),
    "qcompile w4a16-gptq": ("qcompile", "w4a16-gptq", {}),
    "qcompile w4a16-awq": ("qcompile", "w4a16-awq", {}),
    "qcompile nf4": ("qcompile", "nf4", {}),
    "ort MatMulNBits RTN sym b32": ("ort", "DEFAULT", {}),
}
CALIBRATED = {"w4a16-gptq", "w4a16-awq"}
SEQ = 256  # tokens per calibration sample
EVAL_IDS = (2, 64)  # samples x tokens of the logits check, from another seed than the calibration's
VOCAB = 32000


def child_compile(spec: dict) -> dict:
    """One configuration, in this process: compile, save, and the logits against fp32's."""
    output = Path(spec["folder"]) / "model.onnx"
    start = time.perf_counter()
    if spec["tool"] == "qcompile":
        import qcompile

        result = qcompile.compile(spec["input"], recipe=spec["recipe"], calib=spec.get("calib"),
                                  options=spec["options"])
        result.save(output)
        report_peak = result.report["peak_memory_bytes"]
    else:
        int8.ort_nbits_compile({"input": spec["input"], "external_data": True, "params": {
            "algorithm": spec["recipe"], "block_size": 32, "symmetric": True, "accuracy_level": 4}}, output)
        report_peak = None
    seconds = time.perf_counter() - start
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the check's session
    import qcompile

    reference = np.load(spec["reference"])
    logits = qcompile.session(output, threads=int8.THREADS).run(None, {"input_ids": reference["ids"]})[0]
    ref = reference["logits"].reshape(-1, VOCAB).astype(np.float64)
    got = logits.reshape(-1, VOCAB).astype(np.float64)
    cosine = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    size = sum(p.stat().st_size for p in Path(spec["folder"]).iterdir())
    return {"seconds": seconds, "max_rss_bytes": max_rss, "report_peak_bytes": report_peak, "size_bytes": size,
            "cosine": float(cosine.mean()), "top1": float((ref.argmax(1) == got.argmax(1)).mean())}


def child_reference(spec: dict) -> dict:
    """fp32 logits on the evaluation tokens."""
    import qcompile

    ids = np.random.default_rng(1).integers(0, VOCAB, EVAL_IDS)
    logits = qcompile.session(spec["input"], threads=int8.THREADS).run(None, {"input_ids": ids})[0]
    np.savez(spec["reference"], ids=ids, logits=logits)
    return {}


def run_child(kind: str, spec: dict, timeout_s: float) -> dict:
    """``kind`` in a child process: its result and wall time."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", kind, json.dumps(spec)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"error": f"killed after {timeout_s:.0f} s"}
    result = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else {
        "error": (err.strip().splitlines() or ["exit code %d" % process.returncode])[-1][:400]}
    result["wall_seconds"] = time.perf_counter() - start
    return result


def write_markdown(path: Path, doc: dict) -> None:
    lines = [f"# Large-model benchmark, {doc['date']}", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
             f"{doc['machine']['memory_gb']} GB, VNNI {bool(doc['machine']['vnni'])}, ONNX Runtime "
             f"{doc['machine']['onnxruntime']}, qcompile commit {doc['machine']['commit']}.",
             f"Model: {doc['model']} ({doc['input_bytes'] / 1e9:.2f} GB of fp32 weights, random). "
             f"Calibration (GPTQ, AWQ): {doc['calib_samples']} samples of {SEQ} random tokens. "
             "Logits against fp32 on 2 x 64 other random tokens: a check that the compile is right, not a "
             "quality score (the weights are random).", "",
             "| configuration | compile (s) | peak memory, kernel's count (GB) | report's peak (GB) | size (GB) "
             "| logits cosine | top-1 agreement |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in doc["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        report = f"{r['report_peak_bytes'] / 1e9:.2f}" if r.get("report_peak_bytes") else "-"
        lines.append(f"| {name} | {r['seconds']:.0f} | {r['max_rss_bytes'] / 1e9:.2f} | {report} | "
                     f"{r['size_bytes'] / 1e9:.3f} | {r['cosine']:.4f} | {r['top1']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", help="comma-separated patterns of configuration names")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child
        print(json.dumps({"compile": child_compile, "reference": child_reference}[kind](json.loads(spec))))
        return 0

    from qcompile.models.registry import build_cached
    from qcompile.models.synthetic_llama import ENTRY

    patterns = args.configs.split(",") if args.configs else ["*"]
    chosen = [name for name in CONFIGS if any(fnmatch.fnmatch(name, p) for p in patterns)]
    model = build_cached(ENTRY)
    work = Path(tempfile.mkdtemp(prefix="qcompile-large-"))
    calib = work / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, VOCAB, (args.calib_samples, SEQ)))
    reference = work / "reference.npz"
    int8.say(f"fp32 logits of {model} ...")
    run_child("reference", {"input": str(model), "reference": str(reference)}, args.timeout)
    results = {}
    for name in chosen:
        tool, recipe, options = CONFIGS[name]
        folder = work / name.replace(" ", "_").replace("=", "")
        folder.mkdir()
        int8.say(f"{name} ...")
        results[name] = run_child("compile", {
            "tool": tool, "recipe": recipe, "options": options, "input": str(model), "folder": str(folder),
            "reference": str(reference), "calib": str(calib) if recipe in CALIBRATED else None}, args.timeout)
        int8.say(f"{name}: {json.dumps(results[name])}")
        for file in folder.iterdir():  # 0.2-0.8 GB each
            file.unlink()
    machine = int8.machine_info()
    date = datetime.date.today().isoformat()
    doc = {"date": date, "machine": machine, "model": ENTRY.name, "input_bytes": sum(
        p.stat().st_size for p in model.parent.iterdir()), "calib_samples": args.calib_samples, "results": results}
    stem = int8.RESULTS_DIR / f"large-model-{date}-{int8.machine_slug(machine)}"
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")  # not with_suffix: the stem ends "1.32.0"
    write_markdown(Path(f"{stem}.md"), doc)
    int8.say(f"written {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
