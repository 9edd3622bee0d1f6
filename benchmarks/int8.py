#!/usr/bin/env python
"""INT8 benchmark: qcompile's INT8 recipes next to ONNX Runtime's and AMD Quark's quantizers, in one run.

    .venv/bin/python benchmarks/int8.py [--models mobilenetv2,minilm,smollm2] [--quick] [--configs PATTERN,...]

For each model (built by `qcompile.models`, cached in the user cache dir) it draws a calibration set
and a disjoint evaluation set from the model's data helpers, saves them as .npz under
``<qcompile cache>/bench/``, and then, configuration by configuration:

* quantizes the fp32 model in a child process (qcompile's `w8a8` with each calibration method,
  `w8a8-dynamic`, `w8a16`; ORT's `quant_pre_process` + `quantize_static` / `quantize_dynamic` as its
  docs describe; AMD Quark's ONNX quantizer with its INT8 presets, in a venv of its own built on first
  use under ``<qcompile cache>/bench/``, since Quark pins an older onnx), measuring wall time and peak RSS,
  under a memory cap (RLIMIT_DATA plus an RSS watchdog) and a time limit,
  so that a failure, an out-of-memory or a timeout is recorded instead of ending the run;
* evaluates the result in another child against fp32 (MobileNetV2: top-1 agreement and
  KL(fp32 || quantized); MiniLM: cosine of `sentence_embedding`; SmolLM2: perplexity on held-apart text);
* records its size on disk (model + external data);

and finally measures ONNX Runtime CPU latency of fp32 and every quantized model interleaved
(round-robin, several rounds, median) in one child process with ``intra_op_num_threads=2``.

Results: ``benchmarks/results/int8-<date>-<machine>[-quick].json`` and ``.md`` (a file from the same
day and machine is updated model by model, so models can be run separately).
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np  # module level: the standard library and numpy only, as Quark's venv runs this file too

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
GiB = 1 << 30
MiB = 1 << 20
THREADS = 2  # intra_op_num_threads of every evaluation and latency session
# AMD Quark 0.13 declares onnx>=1.21,<=1.22 (so it cannot share qcompile's venv) and, in its "cli" extra,
# onnxruntime>=1.22.2,<=1.28. It imports torch, whose C++ extension tooling builds Quark's custom-op library on
# first import; torch is pinned to its CPU build by the local version, so that pip fails rather than fetch a
# multi-GB CUDA build from PyPI.
QUARK_PACKAGES = ("amd-quark==0.13", "onnx==1.22.0", "onnxruntime==1.28.0", "torch==2.13.0+cpu")
QUARK_VENV = "quark-0.13-venv"  # under <qcompile cache>/bench/
QUARK_TORCH_EXTENSIONS = "torch_extensions"  # in Quark's venv: where its custom-op library is built

# ---------------------------------------------------------------------------------------------
# What is benchmarked


@dataclass(frozen=True)
class ModelSpec:
    name: str
    calib_n: int  # calibration samples (SmolLM2: windows of calib_seq tokens)
    eval_n: int  # evaluation samples (SmolLM2: windows of eval_seq tokens)
    quick_calib_n: int
    quick_eval_n: int
    latency_batches: tuple[int, ...]
    eval_batch: int  # samples per run while evaluating
    calib_seq: int | None = None
    eval_seq: int | None = None
    latency_seq: int | None = None
    latency_group: int = 0  # >0: at most this many quantized sessions held at once in the latency child
    # also time one token (every matmul at M = 1, as in decoding; the graphs have no KV cache)
    token_latency: bool = False

    @property
    def latency_labels(self) -> list[str]:
        return [f"b{b}" for b in self.latency_batches] + (["token"] if self.token_latency else [])


MODELS: dict[str, ModelSpec] = {
    # ORT's MinMax/Entropy/Percentile calibrators hold every activation of every calibration sample in
    # memory, so the calibration sets are sized for them (see README); qcompile streams.
    "mobilenetv2": ModelSpec("mobilenetv2", calib_n=64, eval_n=200, quick_calib_n=8, quick_eval_n=16,
                             latency_batches=(1, 8), eval_batch=8),
    "minilm": ModelSpec("minilm", calib_n=64, eval_n=192, quick_calib_n=8, quick_eval_n=32,
                        latency_batches=(1, 8), eval_batch=8),
    "smollm2": ModelSpec("smollm2", calib_n=16, eval_n=24, quick_calib_n=4, quick_eval_n=4,
                         latency_batches=(1,), eval_batch=1, calib_seq=128, eval_seq=256, latency_seq=128,
                         latency_group=0, token_latency=True),
}


@dataclass(frozen=True)
class Config:
    id: str
    tool: str  # "qcompile" | "ort" | "quark"
    label: str
    params: dict
    quick: bool = False  # part of the --quick subset
    skip: dict = field(default_factory=dict)  # model -> reason
    models: tuple[str, ...] = ()  # the models it is meant for (empty: every model); the others do not list it
    skip_quick: str | None = None  # reason to skip it in --quick, even when --configs names it
    compile_timeout: float = 0.0  # seconds, where it needs more than --compile-timeout
    # Its quantizer imports torch (ORT's HQQ): it runs in Quark's venv, which has a CPU torch (and its own ORT).
    needs_torch: bool = False

    @property
    def in_quark_venv(self) -> bool:
        return self.tool == "quark" or self.needs_torch


_HISTOGRAM_SKIP = {
    "smollm2": "skipped: memory (ORT's Entropy/Percentile calibrators keep every activation of every sample; "
               "measured past 20 GB on SmolLM2, see shared/MODELS.md)",
}


def configurations() -> list[Config]:
    configs = []
    for method in ("minmax", "percentile", "entropy", "mse"):
        configs.append(Config(f"qc-w8a8-{method}", "qcompile", f"qcompile w8a8 {method}",
                              {"recipe": "w8a8", "options": {"calib_method": method}, "calib": True},
                              quick=method in ("minmax", "entropy")))
    # The plain 8-bit grid stored as UINT8 (u8 x u8 kernels, exact everywhere but slower; the default until
    # 2026-11-22), next to the default's pair-limited INT8 weights on the faster u8 x s8 kernels.
    configs.append(Config("qc-w8a8-minmax-u8u8", "qcompile", "qcompile w8a8 minmax, cpu=u8u8",
                          {"recipe": "w8a8", "options": {"cpu": "u8u8"}, "calib": True}))
    # min/max averaged over the calibration batches (`moving_average`; Quark's transformer preset does this).
    configs.append(Config("qc-w8a8-minmax-ema", "qcompile", "qcompile w8a8 minmax, moving_average=0.01",
                          {"recipe": "w8a8", "options": {"moving_average": 0.01}, "calib": True}))
    configs.append(Config("qc-w8a8-dynamic", "qcompile", "qcompile w8a8-dynamic",
                          {"recipe": "w8a8-dynamic", "options": {}, "calib": True}, quick=True))
    configs.append(Config("qc-w8a16", "qcompile", "qcompile w8a16 (weight-only)",
                          {"recipe": "w8a16", "options": {}, "calib": True}, quick=True))
    # ORT static, QDQ, U8S8 (QUInt8 activations, QInt8 weights: what quantize_static's docstring advises for
    # x86 CPUs). MinMax is run first: its peak memory predicts Entropy/Percentile's.
    for per_channel in (True, False):
        for reduce_range in (False, True):
            tag = ("pc" if per_channel else "pt") + ("-rr" if reduce_range else "")
            configs.append(Config(
                f"ort-static-minmax-{tag}", "ort",
                f"ORT static MinMax {'per-channel' if per_channel else 'per-tensor'}{' reduce_range' if reduce_range else ''}",
                {"mode": "static", "method": "MinMax", "per_channel": per_channel, "reduce_range": reduce_range},
                quick=(per_channel and not reduce_range)))
    for method in ("Entropy", "Percentile"):
        configs.append(Config(f"ort-static-{method.lower()}-pc", "ort", f"ORT static {method} per-channel",
                              {"mode": "static", "method": method, "per_channel": True, "reduce_range": False},
                              quick=method == "Entropy", skip=_HISTOGRAM_SKIP))
    for per_channel in (True, False):
        for reduce_range in (False, True):
            tag = ("pc" if per_channel else "pt") + ("-rr" if reduce_range else "")
            configs.append(Config(
                f"ort-dynamic-{tag}", "ort",
                f"ORT dynamic {'per-channel' if per_channel else 'per-tensor'}{' reduce_range' if reduce_range else ''}",
                {"mode": "dynamic", "per_channel": per_channel, "reduce_range": reduce_range},
                quick=per_channel))
    # AMD Quark: its documented presets (`QConfig.get_default_config(NAME)`), each on the models it is meant for.
    # INT8_CNN_DEFAULT: MinMax, QDQ, asymmetric QUInt8 activations, symmetric per-tensor QInt8 weights, CLE;
    # A8W8 ("our default setup" in Quark's basic usage): symmetric QInt8 activations and weights;
    # INT8_CNN_ACCURATE: Percentile + AdaRound; INT8_TRANSFORMER_DEFAULT: MinMax with a moving average,
    # QUInt8 / QInt8, only MatMul and Gemm with a constant weight quantized. "-pc": the preset with its
    # `per_channel` switched on.
    cnn, transformers = ("mobilenetv2",), ("minilm", "smollm2")
    for preset, per_channel, models, quick in (("INT8_CNN_DEFAULT", False, cnn, True),
                                               ("INT8_CNN_DEFAULT", True, cnn, False),
                                               ("A8W8", False, cnn, False),
                                               ("INT8_TRANSFORMER_DEFAULT", False, transformers, True),
                                               ("INT8_TRANSFORMER_DEFAULT", True, transformers, False)):
        configs.append(Config(f"quark-{preset.lower().replace('_', '-')}{'-pc' if per_channel else ''}", "quark",
                              f"Quark {preset}{' per-channel' if per_channel else ''}",
                              {"preset": preset, "per_channel": per_channel}, quick=quick, models=models))
    configs.append(Config("quark-int8-cnn-accurate", "quark", "Quark INT8_CNN_ACCURATE (AdaRound)",
                          {"preset": "INT8_CNN_ACCURATE", "per_channel": False}, models=cnn,
                          skip_quick="skipped: --quick (AdaRound takes 10-25 min on MobileNetV2 with 2 cores)",
                          compile_timeout=3600.0))
    return configs


def int4_configurations() -> list[Config]:
    """qcompile's INT4 recipes (w4a16-rtn, w4a16-hqq, w4a16-gptq, w4a16-awq; RTN on MatMulNBits and on qcompile's
    own BlockQuantMatMul, kernel=custom) and ONNX Runtime's
    `MatMulNBitsQuantizer` (its DEFAULT round to nearest; HQQ and K_QUANT, which are asymmetric only; GPTQ, run
    symmetric only to bound the run's length: it was seen to take over 15 minutes) at block sizes 32 and 128, symmetric
    and asymmetric, each at MatMulNBits accuracy_level 4 (activations quantized to int8 per block: the fast
    path) unless its id ends in -acc0; qcompile's `nf4` (absmax in 8 bits or float, on MatMulBnb4; in 8 bits on
    BlockQuantMatMul, -custom) and ONNX Runtime's `MatMulBnb4Quantizer` (NF4, float absmax) at blocks of 64 and
    128; `fp8` and `w8a8-smoothquant`, and ONNX Runtime's static FP8."""
    configs = []
    for block in (32, 128):
        for symmetric in (True, False):
            tag = f"b{block}-{'sym' if symmetric else 'asym'}"
            quick = block == 128 and symmetric
            hqq = () if symmetric else (("w4a16-hqq", 4),)  # HQQ fits zero points: asymmetric only
            for recipe, level in (("w4a16-rtn", 4), ("w4a16-rtn", 0), *hqq, ("w4a16-gptq", 4), ("w4a16-awq", 4)):
                suffix = "" if level == 4 else "-acc0"
                configs.append(Config(f"qc-{recipe}-{tag}{suffix}", "qcompile",
                                      f"qcompile {recipe} block {block} {'symmetric' if symmetric else 'asymmetric'}"
                                      f", accuracy_level {level}",
                                      {"recipe": recipe, "calib": recipe in ("w4a16-gptq", "w4a16-awq"),
                                       "options": {"block_size": block, "symmetric": symmetric,
                                                   "accuracy_level": level}}, quick=quick and level == 4))
            configs.append(Config(f"qc-w4a16-rtn-{tag}-custom", "qcompile",
                                  f"qcompile w4a16-rtn block {block} {'symmetric' if symmetric else 'asymmetric'}, "
                                  f"kernel=custom (qcompile's BlockQuantMatMul)",
                                  {"recipe": "w4a16-rtn", "calib": False,
                                   "options": {"block_size": block, "symmetric": symmetric, "kernel": "custom"}}))
            for algorithm in ("DEFAULT", "GPTQ") if symmetric else ("DEFAULT", "HQQ", "K_QUANT"):
                configs.append(Config(f"ort-nbits-{algorithm.lower()}-{tag}", "ort",
                                      f"ORT MatMulNBitsQuantizer {algorithm} block {block} "
                                      f"{'symmetric' if symmetric else 'asymmetric'}, accuracy_level 4"
                                      + (" (Quark's venv: ORT 1.28 with CPU torch)" if algorithm in ("HQQ", "GPTQ")
                                         else ""),
                                      {"mode": "nbits", "algorithm": algorithm, "block_size": block,
                                       "symmetric": symmetric, "accuracy_level": 4}, quick=quick,
                                      needs_torch=algorithm in ("HQQ", "GPTQ")))
    for block in (64, 128):  # NF4: QLoRA's block of 64, and 128
        for double_quant in (True, False):
            configs.append(Config(f"qc-nf4-b{block}{'' if double_quant else '-float-scales'}", "qcompile",
                                  f"qcompile nf4 block {block}, absmax {'in 8 bits' if double_quant else 'float'}",
                                  {"recipe": "nf4", "calib": False,
                                   "options": {"block_size": block, "double_quant": double_quant}}))
        configs.append(Config(f"qc-nf4-b{block}-custom", "qcompile", f"qcompile nf4 block {block}, absmax in 8 bits, "
                              f"kernel=custom (qcompile's BlockQuantMatMul: int8 code book, int8 activations)",
                              {"recipe": "nf4", "calib": False, "options": {"block_size": block, "kernel": "custom"}}))
        configs.append(Config(f"ort-bnb4-nf4-b{block}", "ort", f"ORT MatMulBnb4Quantizer NF4 block {block}",
                              {"mode": "bnb4", "block_size": block}))
    # FP8 and SmoothQuant INT8 (activations quantized too), against ORT's static FP8 (its quant_pre_process first)
    for activations in ("e4m3", "e5m2"):
        configs.append(Config(f"qc-fp8-{activations}", "qcompile", f"qcompile fp8, E4M3 weights, {activations} "
                              f"activations", {"recipe": "fp8", "calib": True, "options": {"activations": activations}}))
    configs.append(Config("ort-static-fp8", "ort", "ORT quantize_static QDQ, E4M3FN weights and activations, "
                          "Distribution (the only calibration it takes for FP8)",
                          {"mode": "static", "method": "Distribution", "per_channel": True, "reduce_range": False,
                           "activation_type": "QFLOAT8E4M3FN", "weight_type": "QFLOAT8E4M3FN"}))
    configs.append(Config("qc-w8a8-smoothquant", "qcompile", "qcompile w8a8-smoothquant",
                          {"recipe": "w8a8-smoothquant", "calib": True, "options": {}}))
    for threshold in (6.0, 2.0):  # LLM.int8()'s default; 2: within 2% of fp32 on a held-out text (README)
        configs.append(Config(f"qc-llm-int8-t{threshold:g}", "qcompile", f"qcompile llm-int8 (qcompile's "
                              f"OutlierSplitMatMul), outlier threshold {threshold:g}",
                              {"recipe": "llm-int8", "calib": False, "options": {"threshold": threshold}}))
    return configs


FAMILIES = {"int8": configurations, "int4": int4_configurations}
# ORT's weight-only quantizers: they take the fp32 model, not quant_pre_process's output
WEIGHT_ONLY_MODES = ("nbits", "bnb4")


# ---------------------------------------------------------------------------------------------
# Machine


def _git_commit() -> str:
    """The checkout's commit (with "+changes" when it has uncommitted ones), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def machine_info() -> dict:
    import onnx
    import onnxruntime

    import qcompile

    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model in ("unknown", platform.processor()):
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    meminfo = _meminfo()
    return {
        "cpu": cpu_model,
        "vnni": sorted(f for f in ("avx512_vnni", "avx_vnni") if f in flags),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(meminfo.get("MemTotal", 0) / GiB, 1),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "qcompile": qcompile.__version__,
        "commit": _git_commit(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_slug(info: dict) -> str:
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", "", info["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-")[:40] or "cpu"
    vnni = "vnni" if info["vnni"] else "novnni"
    return f"{cpu}-{vnni}-{info['cores']}c-ort{info['onnxruntime']}"


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# Output


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a log file or a pipe: wide enough for the tables
        console = Console(highlight=False, width=200)
    return console


CONSOLE = None


def say(message: str) -> None:
    global CONSOLE
    if CONSOLE is None:
        CONSOLE = _console()
    CONSOLE.print(f"[dim]{datetime.datetime.now():%H:%M:%S}[/dim] {message}")


def _fmt(value, digits=3, suffix=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, list):  # [value, low, high]
        return f"{_fmt(value[0], digits)} [{_fmt(value[1], digits)}–{_fmt(value[2], digits)}]"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.2e}{suffix}"
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


# ---------------------------------------------------------------------------------------------
# Child processes: every quantization, evaluation and latency measurement runs in one


@dataclass
class ChildOutcome:
    status: str  # ok | failed
    error: str | None
    wall_s: float
    peak_rss_bytes: int
    result: dict


def run_child(kind: str, spec: dict, folder: Path, name: str, timeout_s: float, mem_cap: int,
              what: str, python: str = sys.executable) -> ChildOutcome:
    """Run ``PYTHON int8.py --child KIND SPEC`` with a memory cap (RLIMIT_DATA + RSS watchdog) and a wall-clock limit.

    PYTHON is this venv's interpreter, or Quark's (`quark_venv`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (folder / f"{name}.spec.json", folder / f"{name}.result.json",
                                        folder / f"{name}.log")
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=1))

    def limits():
        # RLIMIT_DATA (heap and private writable mappings), not RLIMIT_AS: onnx_ir maps the whole external
        # data file once per tensor, which takes address space (hundreds of GB on SmolLM2) but no memory.
        resource.setrlimit(resource.RLIMIT_DATA, (mem_cap, mem_cap))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--child", kind, str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=limits, cwd=folder, env=env)  # ORT drops stray files in its cwd
    timed_out, over_cap, beat, peak_seen = False, False, start + 30, 0
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now, rss = time.monotonic(), _rss(proc.pid)
            peak_seen = max(peak_seen, rss)
            timed_out, over_cap = now - start > timeout_s, rss > mem_cap  # the watchdog behind RLIMIT_DATA
            if timed_out or over_cap:
                os.kill(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            if now >= beat:
                say(f"    … {what}: {now - start:.0f} s, RSS {_rss(proc.pid) / GiB:.2f} GB")
                beat += 30
            time.sleep(0.1)
    except BaseException:
        try:
            os.kill(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    peak = max(usage.ru_maxrss * 1024, peak_seen)
    result = {}
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            result = {}
    error = None
    if timed_out:
        error = f"timeout: killed after {timeout_s:.0f} s"
    elif over_cap:
        error = f"out of memory: RSS passed the {_gb(mem_cap)} cap (killed by the benchmark)"
    elif result.get("status") == "failed":
        error = result.get("error") or "failed"
        if _looks_like_oom(error + _tail(log_path)):
            error = f"out of memory (cap {_gb(mem_cap)}): {error}"
    elif proc.returncode != 0 or result.get("status") != "ok":
        tail = _tail(log_path)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            error = f"killed by {sig}" + (" (the kernel's OOM killer?)" if sig == "SIGKILL" else "")
        else:
            error = f"exit code {proc.returncode}"
        if _looks_like_oom(tail):
            error = f"out of memory (cap {_gb(mem_cap)}): {error}"
        last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
        error += f": {last[0].strip()[:300]}" if last[0] else ""
    return ChildOutcome("failed" if error else "ok", error, wall, peak, result)


def _gb(size: float) -> str:
    return f"{size / GiB:.0f} GB" if size >= 10 * GiB else f"{size / GiB:.1f} GB"


def _looks_like_oom(text: str) -> bool:
    return bool(re.search(r"MemoryError|bad_alloc|Failed to allocate|Cannot allocate memory|"
                          r"Unable to allocate|out of memory", text))


def _tail(path: Path, size: int = 4000) -> str:
    try:
        data = path.read_bytes()[-size:]
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _first_lines(exc: BaseException, limit: int = 600) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return re.sub(r"\s+", " ", f"{type(exc).__name__}: {text}")[:limit]


def child_warmup(spec: dict) -> dict:
    """Import what a tool's compile imports, untimed, so that its first timed compile starts as warm as the
    others (files in the page cache); ORT's are warmed by `quant_pre_process`."""
    if spec["tool"] == "qcompile":
        import qcompile.compiler  # noqa: F401
        import qcompile.recipes.int4  # noqa: F401  (the recipes' passes)
        import qcompile.recipes.int8  # noqa: F401
    else:
        import quark.onnx  # noqa: F401
    return {}


def child_main(kind: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    handler = {"compile": child_compile, "preprocess": child_preprocess, "evaluate": child_evaluate,
               "latency": child_latency, "warmup": child_warmup}[kind]
    try:
        result = {"status": "ok", **handler(spec)}
        code = 0
    except BaseException as exc:  # noqa: BLE001 - everything is recorded, the parent decides
        traceback.print_exc()
        result, code = {"status": "failed", "error": _first_lines(exc)}, 1
    Path(spec["result"]).write_text(json.dumps(result, indent=1, default=float))  # Infinity is fine here
    return code


def _json(obj) -> str:
    """JSON without the non-standard Infinity / NaN: non-finite floats become the strings "inf", "-inf", "nan"."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=1, default=float)


def _clear(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _has_external_data(path: str | Path) -> bool:
    from qcompile.compiler import file_bytes

    return file_bytes(path) > Path(path).stat().st_size


def child_preprocess(spec: dict) -> dict:
    """ORT's documented first step: `quant_pre_process` (symbolic shape inference + ORT optimizations)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, output = Path(spec["input"]), Path(spec["output"])
    _clear(output.parent)
    external = _has_external_data(source)
    kwargs = dict(save_as_external_data=external, all_tensors_to_one_file=True,
                  external_data_location=output.name + ".data" if external else None)
    notes = []
    start = time.perf_counter()
    try:
        quant_pre_process(str(source), str(output), **kwargs)
    except Exception as exc:  # noqa: BLE001 - a user would retry without symbolic shape inference
        traceback.print_exc()
        notes.append(f"quant_pre_process failed ({_first_lines(exc, 300)}); retried with skip_symbolic_shape=True")
        _clear(output.parent)
        quant_pre_process(str(source), str(output), skip_symbolic_shape=True, **kwargs)
    return {"seconds": time.perf_counter() - start, "external_data": external, "notes": notes}


def child_compile(spec: dict) -> dict:
    output = Path(spec["output"])
    _clear(output.parent)
    params = spec["params"]
    if spec["tool"] == "qcompile":
        import qcompile

        start = time.perf_counter()
        result = qcompile.compile(spec["input"], recipe=params["recipe"],
                                  calib=spec["calib"] if params["calib"] else None, options=params["options"])
        result.save(output)
        seconds = time.perf_counter() - start
        report = result.report
        (output.parent / "report.json").write_text(json.dumps(report, indent=1, default=str))
        return {"seconds": seconds, "options": report.get("options"), "cpu": report.get("cpu"),
                "notes": report.get("notes"),
                "passes": {p["name"]: round(p.get("seconds", 0.0), 2) for p in report.get("passes", [])}}

    if spec["tool"] == "quark":
        return quark_compile(spec, output)

    if params["mode"] == "nbits":
        return ort_nbits_compile(spec, output)
    if params["mode"] == "bnb4":
        return ort_bnb4_compile(spec, output)

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    start = time.perf_counter()
    if params["mode"] == "static":
        quantize_static(spec["input"], str(output), npz_reader(spec["calib"]), quant_format=QuantFormat.QDQ,
                        per_channel=params["per_channel"], reduce_range=params["reduce_range"],
                        activation_type=getattr(QuantType, params.get("activation_type", "QUInt8")),
                        weight_type=getattr(QuantType, params.get("weight_type", "QInt8")),
                        calibrate_method=getattr(CalibrationMethod, params["method"]),
                        use_external_data_format=spec["external_data"])
    else:
        quantize_dynamic(spec["input"], str(output), per_channel=params["per_channel"],
                         reduce_range=params["reduce_range"], weight_type=QuantType.QInt8,
                         use_external_data_format=spec["external_data"])
    return {"seconds": time.perf_counter() - start}


def ort_nbits_compile(spec: dict, output: Path) -> dict:
    """ONNX Runtime's 4-bit weight-only quantizer as its documentation shows: `MatMulNBitsQuantizer` with an
    algorithm config, `process()`, then the model saved (external data where the input has it)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    params = spec["params"]
    # DEFAULT: no algo_config (round to nearest, in ONNX Runtime's own MLAS code); HQQ takes no is_symmetric;
    # GPTQ reads the calibration data
    algorithm = None
    if params["algorithm"] == "HQQ":
        algorithm = nbits.HQQWeightOnlyQuantConfig(block_size=params["block_size"])
    elif params["algorithm"] == "K_QUANT":  # llama.cpp's scale and min search per block: asymmetric only
        algorithm = nbits.KQuantWeightOnlyQuantConfig()
    elif params["algorithm"] == "GPTQ":  # its defaults otherwise (no act order, damping 0.01)
        algorithm = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=npz_reader(spec["calib"]),
                                                   block_size=params["block_size"])
    start = time.perf_counter()
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(spec["input"]), block_size=params["block_size"],
                                           is_symmetric=params["symmetric"], accuracy_level=params["accuracy_level"],
                                           algo_config=algorithm)
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=spec["external_data"])
    return {"seconds": time.perf_counter() - start}


def ort_bnb4_compile(spec: dict, output: Path) -> dict:
    """ONNX Runtime's NF4 quantizer: `MatMulBnb4Quantizer` (float absmax, no double quantization), `process()`."""
    import onnx
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    start = time.perf_counter()
    quantizer = MatMulBnb4Quantizer(onnx.load(spec["input"]), MatMulBnb4Quantizer.NF4, spec["params"]["block_size"])
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=spec["external_data"])
    return {"seconds": time.perf_counter() - start}


def quark_compile(spec: dict, output: Path) -> dict:
    """AMD Quark as its documentation shows: a default configuration by name, then `ModelQuantizer.quantize_model`
    on the fp32 model with a calibration data reader.

    Runs on Quark's venv's python: imports quark, onnx, onnxruntime and numpy, not qcompile (which needs a newer onnx).
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / QUARK_TORCH_EXTENSIONS))
    import onnx
    import onnxruntime
    import quark
    from quark.onnx import ModelQuantizer, QConfig

    params = spec["params"]
    config = QConfig.get_default_config(params["preset"])
    config.global_quant_config.per_channel = params["per_channel"]
    config.global_quant_config.use_external_data_format = spec["external_data"]
    start = time.perf_counter()
    ModelQuantizer(config).quantize_model(spec["input"], str(output), npz_reader(spec["calib"]))
    return {"seconds": time.perf_counter() - start,
            "versions": {"quark": quark.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}


def npz_reader(path: str):
    """A CalibrationDataReader over a calibration .npz: one sample per call, as ORT's and Quark's examples feed them."""
    from onnxruntime.quantization import CalibrationDataReader

    class NpzReader(CalibrationDataReader):
        def __init__(self):
            with np.load(path) as data:
                self.arrays = {k: data[k] for k in data.files}
            self.n = len(next(iter(self.arrays.values())))
            self.i = 0

        def get_next(self):
            if self.i >= self.n:
                return None
            self.i += 1
            return {k: v[self.i - 1:self.i] for k, v in self.arrays.items()}

    return NpzReader()


def _session(path: str):
    import qcompile

    return qcompile.session(path, threads=THREADS)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, err = ref.astype(np.float64), ref.astype(np.float64) - cand.astype(np.float64)
    noise = float((err * err).sum())
    return float("inf") if noise == 0 else 10 * math.log10(float((ref * ref).sum()) / noise)


def _cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    ref, cand = ref.reshape(len(ref), -1).astype(np.float64), cand.reshape(len(cand), -1).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return np.where(norms > 0, (ref * cand).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)


# Top-1 agreement on a set with near-ties in fp32 is a noisy count: these say how much agreement the
# evaluation set allows at a given SQNR, if the error were i.i.d. Gaussian noise on the logits.
NOISE_DRAWS = 200
TARGET_AGREEMENT = 0.98  # issue 3's MobileNetV2 target


def _iid_noise_agreement(ref: np.ndarray, sqnr_db: float, draws: int = NOISE_DRAWS) -> list[float]:
    """[mean, 5th, 95th percentile] of top-1 agreement over ``draws`` noisy copies of ``ref``."""
    rng = np.random.default_rng(0)
    sigma = math.sqrt(float((ref.astype(np.float64) ** 2).mean()) / 10 ** (sqnr_db / 10))
    top = ref.argmax(-1)
    agree = np.array([(top == (ref + rng.normal(0, sigma, ref.shape)).argmax(-1)).mean() for _ in range(draws)])
    return [float(agree.mean()), *map(float, np.quantile(agree, [0.05, 0.95]))]


def _sqnr_for_agreement(ref: np.ndarray, agreement: float) -> float:
    """The SQNR (dB, to 0.5 dB) at which i.i.d. noise keeps ``agreement`` on average."""
    lo, hi = 0.0, 80.0
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _iid_noise_agreement(ref, mid, draws=50)[0] >= agreement else (mid, hi)
    return hi


def child_evaluate(spec: dict) -> dict:
    """Accuracy of one model on the evaluation set; the fp32 run writes the reference outputs."""
    sess = _session(spec["model"])
    with np.load(spec["eval"]) as data:
        feeds = {k: data[k] for k in data.files}
    n = len(next(iter(feeds.values())))
    start = time.perf_counter()
    if spec["model_name"] == "smollm2":
        from qcompile.models import smollm2

        ppl = smollm2.perplexity(lambda ids: sess.run(["logits"], {"input_ids": ids})[0], feeds["input_ids"])
        return {"perplexity": ppl, "tokens": int(feeds["input_ids"].size), "seconds": time.perf_counter() - start}

    output = {"mobilenetv2": "logits", "minilm": "sentence_embedding"}[spec["model_name"]]
    batch = spec["batch"]
    outputs = np.concatenate([sess.run([output], {k: v[i:i + batch] for k, v in feeds.items()})[0]
                              for i in range(0, n, batch)])
    seconds = time.perf_counter() - start
    if spec.get("write_reference"):
        np.save(spec["reference"], outputs)
        ref = outputs
    else:
        ref = np.load(spec["reference"])
    result = {"samples": n, "seconds": seconds, "sqnr_db": _sqnr_db(ref, outputs),
              "finite": bool(np.isfinite(outputs).all())}
    if spec["model_name"] == "mobilenetv2":
        lp, lq = _log_softmax(ref), _log_softmax(outputs)
        result["top1_agreement"] = float((ref.argmax(-1) == outputs.argmax(-1)).mean())
        result["kl"] = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
        if spec.get("write_reference"):
            result["top1_classes"] = sorted({int(c) for c in ref.argmax(-1)})[:20]
            result["sqnr_db_for_target_agreement"] = _sqnr_for_agreement(ref, TARGET_AGREEMENT)
        elif math.isfinite(result["sqnr_db"]):
            result["iid_noise_agreement"] = _iid_noise_agreement(ref, result["sqnr_db"])
    else:
        cos = _cosines(ref, outputs)
        result["cosine_mean"], result["cosine_min"] = float(cos.mean()), float(cos.min())
    return result


def child_latency(spec: dict) -> dict:
    """Interleaved latency: every round runs each session in turn (rotating order); medians per session."""
    sessions, errors = {}, {}
    for cid, path in spec["models"]:
        try:
            sessions[cid] = _session(path)
        except Exception as exc:  # noqa: BLE001
            errors[cid] = _first_lines(exc, 300)
    results = {cid: {} for cid, _ in spec["models"]}
    for label, feed_path in spec["feeds"].items():
        with np.load(feed_path) as data:
            feed = {k: data[k] for k in data.files}
        live = [cid for cid in sessions if cid not in errors]
        for cid in list(live):  # warm-up (and catch run-time failures)
            try:
                for _ in range(2):
                    sessions[cid].run(None, feed)
            except Exception as exc:  # noqa: BLE001
                errors[cid] = f"{label}: {_first_lines(exc, 300)}"
                live.remove(cid)
        times = {cid: [] for cid in live}
        for r in range(spec["rounds"]):
            order = live[r % max(len(live), 1):] + live[:r % max(len(live), 1)]
            for cid in order:
                sess, runs, until = sessions[cid], 0, time.perf_counter() + spec["min_time_s"]
                while runs < spec["min_runs"] or time.perf_counter() < until:
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times[cid].append(time.perf_counter() - t0)
                    runs += 1
            print(f"latency {label}: round {r + 1}/{spec['rounds']} done", flush=True)
        for cid, ts in times.items():
            results[cid][label] = {"median_ms": 1e3 * statistics.median(ts), "runs": len(ts),
                                         "min_ms": 1e3 * min(ts), "p10_ms": 1e3 * float(np.percentile(ts, 10))}
    return {"latency": results, "errors": errors, "loadavg_after": list(os.getloadavg())}


# ---------------------------------------------------------------------------------------------
# AMD Quark's venv


def quark_venv(venv: Path) -> dict:
    """Quark's own venv, built on first use: its python and package versions, or the error that stopped the build."""
    marker = venv / "installed.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info["packages"] == list(QUARK_PACKAGES):
            say(f"  Quark: venv {venv} (quark {info['versions']['quark']}, onnx {info['versions']['onnx']}, "
                f"onnxruntime {info['versions']['onnxruntime']}, torch {info['versions']['torch']})")
            return info
    log = venv.parent / f"{venv.name}-install.log"
    say(f"  Quark: building its venv {venv} (once; about 1.6 GB, 3 minutes): "
        f"pip install {' '.join(QUARK_PACKAGES)}; log {log}")
    start = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    # as in an activated venv (torch's extension builder looks for ninja on PATH), and Quark's build kept in it
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "TORCH_EXTENSIONS_DIR": str(venv / QUARK_TORCH_EXTENSIONS)}
    # The first import of quark.onnx builds its custom-op library (about 30 s): done here, not in a timed child.
    check = ("import json, numpy, onnx, onnxruntime, quark.onnx, torch; print(json.dumps({'quark': quark.__version__, "
             "'onnx': onnx.__version__, 'onnxruntime': onnxruntime.__version__, 'torch': torch.__version__, "
             "'numpy': numpy.__version__}))")
    try:
        with log.open("w") as out:
            for command in ([sys.executable, "-m", "venv", str(venv)],
                            [str(python), "-m", "pip", "install", *QUARK_PACKAGES],
                            [str(python), "-c", check]):
                out.write(f"$ {' '.join(command)}\n")
                out.flush()
                subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        lines = [line.strip() for line in _tail(log).splitlines() if line.strip()]
        reason = lines[-1][:300] if isinstance(exc, subprocess.CalledProcessError) and lines else _first_lines(exc, 300)
        error = f"could not install Quark venv: {reason}"
        say(f"  [red]Quark: {error}[/] — Quark configurations are recorded as failed; see {log}")
        return {"error": error, "packages": list(QUARK_PACKAGES), "log": str(log)}
    versions = json.loads(_tail(log).strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    info = {"python": str(python), "packages": list(QUARK_PACKAGES), "versions": versions,
            "install_s": time.monotonic() - start, "size_bytes": size}
    marker.write_text(json.dumps(info, indent=1))
    say(f"  Quark: venv ready in {info['install_s']:.0f} s, {size / GiB:.1f} GB: " +
        ", ".join(f"{k} {v}" for k, v in versions.items()))
    return info


# ---------------------------------------------------------------------------------------------
# The benchmark of one model


def _row_hashes(data: dict[str, np.ndarray]) -> set[str]:
    keys = sorted(data)
    n = len(data[keys[0]])
    return {hashlib.sha1(b"".join(np.ascontiguousarray(data[k][i]).tobytes() for k in keys)).hexdigest()
            for i in range(n)}


def make_data(spec: ModelSpec, quick: bool, work: Path) -> dict:
    from qcompile.models import minilm, mobilenetv2, smollm2

    calib_n = spec.quick_calib_n if quick else spec.calib_n
    eval_n = spec.quick_eval_n if quick else spec.eval_n
    if spec.name == "mobilenetv2":
        calib, evaluation = mobilenetv2.image_data("calibration", calib_n), mobilenetv2.image_data("evaluation", eval_n)
    elif spec.name == "minilm":
        calib, evaluation = minilm.sentence_data("calibration", calib_n), minilm.sentence_data("evaluation", eval_n)
    else:
        calib = smollm2.text_windows("calibration", calib_n, spec.calib_seq)
        evaluation = smollm2.text_windows("evaluation", eval_n, spec.eval_seq)
    shared = _row_hashes(calib) & _row_hashes(evaluation)
    if shared:
        raise RuntimeError(f"{spec.name}: {len(shared)} samples are in both the calibration and evaluation sets")
    paths = {"calib": work / "calib.npz", "eval": work / "eval.npz"}
    np.savez(paths["calib"], **calib)
    np.savez(paths["eval"], **evaluation)
    feeds = {}
    for batch in spec.latency_batches:  # latency inputs: the first samples of the evaluation set
        feed = {}
        for k, v in evaluation.items():
            rows = v[:batch] if len(v) >= batch else np.concatenate([v] * math.ceil(batch / len(v)))[:batch]
            feed[k] = rows[:, :spec.latency_seq] if spec.latency_seq else rows
        path = work / f"latency-b{batch}.npz"
        np.savez(path, **feed)
        feeds[f"b{batch}"] = str(path)
    if spec.token_latency:
        path = work / "latency-token.npz"
        np.savez(path, **{k: v[:1, :1] for k, v in evaluation.items()})
        feeds["token"] = str(path)
    shapes = lambda d: {k: list(v.shape) for k, v in d.items()}  # noqa: E731
    return {"paths": {k: str(v) for k, v in paths.items()}, "latency_feeds": feeds,
            "calibration": {"split": "calibration", "shapes": shapes(calib)},
            "evaluation": {"split": "evaluation", "shapes": shapes(evaluation)}}


def selected(configs: list[Config], quick: bool, patterns: list[str] | None) -> list[Config]:
    chosen = [c for c in configs if c.quick or not quick]
    if patterns:
        chosen = [c for c in configs if any(fnmatch.fnmatch(c.id, p) or p == c.id for p in patterns)]
    return chosen


def bench_model(spec: ModelSpec, args, configs: list[Config], work_root: Path) -> dict:
    from qcompile.compiler import file_bytes
    from qcompile.models import registry
    from qcompile.models import minilm, mobilenetv2, smollm2

    entry = {"mobilenetv2": mobilenetv2.ENTRY, "minilm": minilm.ENTRY, "smollm2": smollm2.ENTRY}[spec.name]
    configs = [c for c in configs if not c.models or spec.name in c.models]
    work = work_root / spec.name
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    model_start = time.monotonic()
    say(f"[bold cyan]{spec.name}[/]: building / taking the fp32 model from the cache")
    fp32_path = registry.build_cached(entry)
    say(f"  fp32 model {fp32_path} ({file_bytes(fp32_path) / MiB:.1f} MB)")
    data = make_data(spec, args.quick, work)
    say(f"  data: calibration {data['calibration']['shapes']}, evaluation {data['evaluation']['shapes']} → {work}")

    out = {"model": spec.name, "fp32_model": str(fp32_path), "data": data, "configs": [],
           "run_at": datetime.datetime.now().isoformat(timespec="seconds")}

    def evaluate(cid: str, path: Path, write_reference: bool = False) -> ChildOutcome:
        return run_child("evaluate", {"model": str(path), "model_name": spec.name, "eval": data["paths"]["eval"],
                                      "reference": str(work / "reference.npy"), "batch": spec.eval_batch,
                                      "write_reference": write_reference},
                         logs, f"{cid}.evaluate", args.eval_timeout, args.mem_cap, f"{cid} evaluation")

    say("  fp32: evaluating (reference outputs)")
    ev = evaluate("fp32", fp32_path, write_reference=True)
    if ev.status != "ok":
        raise RuntimeError(f"{spec.name}: the fp32 reference failed to run: {ev.error}")
    fp32 = {"id": "fp32", "tool": "-", "label": "fp32 reference", "status": "ok", "path": str(fp32_path),
            "size_bytes": file_bytes(fp32_path), "accuracy": _accuracy(ev.result), "eval_seconds": ev.wall_s}
    say(f"  fp32: {_accuracy_text(spec.name, fp32['accuracy'])}")
    out["fp32"] = fp32

    preprocessed = None
    if any(c.tool == "ort" and c.params["mode"] not in WEIGHT_ONLY_MODES for c in configs):
        say("  ORT quant_pre_process")
        pre_path = work / "ort-preprocessed" / f"{spec.name}.onnx"
        pre = run_child("preprocess", {"input": str(fp32_path), "output": str(pre_path)}, logs, "ort-preprocess",
                        args.compile_timeout, args.mem_cap, "quant_pre_process")
        out["ort_preprocess"] = {"status": pre.status, "error": pre.error, "wall_s": pre.wall_s,
                                 "peak_rss_bytes": pre.peak_rss_bytes, **{k: v for k, v in pre.result.items()
                                                                           if k != "status"}}
        if pre.status == "ok":
            preprocessed = pre_path
            say(f"    ok in {pre.wall_s:.1f} s, peak {pre.peak_rss_bytes / GiB:.2f} GB"
                + (f"; {'; '.join(pre.result.get('notes', []))}" if pre.result.get("notes") else ""))
        else:
            say(f"    [red]failed[/]: {pre.error} — ORT configurations quantize the raw fp32 model")
            preprocessed = fp32_path

    warm = {c.tool for c in configs} & {"qcompile", "quark"} - ({"quark"} if "error" in args.quark else set())
    for tool in sorted(warm):
        run_child("warmup", {"tool": tool}, logs, f"warmup-{tool}", args.compile_timeout, args.mem_cap,
                  f"{tool} warm-up", python=args.quark["python"] if tool == "quark" else sys.executable)

    minmax_peak = None
    for i, config in enumerate(configs, 1):
        rec = {"id": config.id, "tool": config.tool, "label": config.label, "params": config.params}
        out["configs"].append(rec)
        head = f"  [{i}/{len(configs)}] [bold]{config.id}[/]"
        reason = config.skip.get(spec.name) or (config.skip_quick if args.quick else None)
        if reason:
            rec.update(status="skipped", error=reason)
            say(f"{head}: {reason}")
            continue
        if config.in_quark_venv and "error" in args.quark:
            rec.update(status="failed", stage="install", error=args.quark["error"])
            say(f"{head}: [red]{args.quark['error']}[/]")
            continue
        if (config.tool == "ort" and config.params.get("method") in ("Entropy", "Percentile")
                and minmax_peak and 1.5 * minmax_peak > args.mem_cap):
            reason = (f"skipped: memory (ORT's MinMax calibration peaked at {minmax_peak / GiB:.1f} GB; "
                      f"the histogram calibrators hold the same activations and more, cap {args.mem_cap / GiB:.0f} GB)")
            rec.update(status="skipped", error=reason)
            say(f"{head}: {reason}")
            continue
        model_path = work / "configs" / config.id / f"{spec.name}.onnx"
        source = preprocessed if config.tool == "ort" and config.params["mode"] not in WEIGHT_ONLY_MODES else fp32_path
        child_spec = {"tool": config.tool, "params": config.params, "output": str(model_path), "input": str(source),
                      "external_data": _has_external_data(source), "calib": data["paths"]["calib"]}
        say(f"{head}: quantizing")
        comp = run_child("compile", child_spec, logs, f"{config.id}.compile",
                         max(args.compile_timeout, config.compile_timeout), args.mem_cap, config.id,
                         python=args.quark["python"] if config.in_quark_venv else sys.executable)
        rec["compile"] = {"wall_s": comp.wall_s, "seconds": comp.result.get("seconds"),
                          "peak_rss_bytes": comp.peak_rss_bytes,
                          **{k: v for k, v in comp.result.items() if k not in ("status", "error", "seconds")}}
        if config.tool == "ort" and config.params.get("mode") == "static" and config.params.get("method") == "MinMax":
            minmax_peak = max(minmax_peak or 0, comp.peak_rss_bytes)
        if comp.status != "ok":
            rec.update(status="failed", stage="compile", error=comp.error)
            say(f"    [red]compile failed[/] after {comp.wall_s:.1f} s (peak {comp.peak_rss_bytes / GiB:.2f} GB): "
                f"{comp.error}")
            continue
        rec["path"], rec["size_bytes"] = str(model_path), file_bytes(model_path)
        say(f"    compiled in {comp.wall_s:.1f} s (peak {comp.peak_rss_bytes / GiB:.2f} GB), "
            f"{rec['size_bytes'] / MiB:.1f} MB; evaluating")
        ev = evaluate(config.id, model_path)
        rec["eval_seconds"] = ev.wall_s
        if ev.status != "ok":
            rec.update(status="failed", stage="evaluate", error=ev.error)
            say(f"    [red]evaluation failed[/]: {ev.error}")
            continue
        rec.update(status="ok", accuracy=_accuracy(ev.result))
        say(f"    {_accuracy_text(spec.name, rec['accuracy'], fp32['accuracy'])}")

    if not args.skip_latency:
        measure_latency(spec, args, out, work, logs)
    out["wall_s"] = time.monotonic() - model_start
    say(f"[bold cyan]{spec.name}[/]: done in {out['wall_s'] / 60:.1f} min")
    return out


def measure_latency(spec: ModelSpec, args, out: dict, work: Path, logs: Path) -> None:
    ok = [c for c in out["configs"] if c.get("status") == "ok"]
    group = spec.latency_group or len(ok) or 1
    groups = [ok[i:i + group] for i in range(0, len(ok), group)] or [[]]
    rounds, min_time = (3, 0.2) if args.quick else (args.latency_rounds, 0.5)
    fp32_runs: dict[str, list[dict]] = {}
    for g, members in enumerate(groups, 1):
        models = [("fp32", out["fp32"]["path"])] + [(c["id"], c["path"]) for c in members]
        say(f"  latency{f' (group {g}/{len(groups)})' if len(groups) > 1 else ''}: {len(models)} models interleaved, "
            f"inputs {', '.join(out['data']['latency_feeds'])}, {rounds} rounds")
        load_before = list(os.getloadavg())
        lat = run_child("latency", {"models": models, "feeds": out["data"]["latency_feeds"], "rounds": rounds,
                                    "min_time_s": min_time, "min_runs": 3}, logs, f"latency-{g}",
                        args.latency_timeout, args.mem_cap, "latency")
        if lat.status != "ok":
            say(f"    [red]latency failed[/]: {lat.error}")
            for c in members:
                c["latency_error"] = lat.error
            continue
        measured = lat.result["latency"]
        out.setdefault("latency_load", []).append({"loadavg_before": load_before,
                                                  "loadavg_after": lat.result.get("loadavg_after")})
        if max(load_before[0], (lat.result.get("loadavg_after") or [0])[0]) > 1.5 * THREADS:
            say(f"    [yellow]the machine was busy (load average {load_before[0]:.1f} → "
                f"{lat.result['loadavg_after'][0]:.1f}): latencies are noisy[/]")
        for key, value in measured.get("fp32", {}).items():
            fp32_runs.setdefault(key, []).append(value)
        for c in members:
            if c["id"] in lat.result["errors"]:
                c["latency_error"] = lat.result["errors"][c["id"]]
            c["latency"] = {}
            for key, value in measured.get(c["id"], {}).items():
                ref = measured.get("fp32", {}).get(key)
                c["latency"][key] = {**value, "fp32_median_ms": ref and ref["median_ms"],
                                     "ratio": ref and value["median_ms"] / ref["median_ms"],
                                     "ratio_p10": ref and value["p10_ms"] / ref["p10_ms"]}
    out["fp32"]["latency"] = {key: {"median_ms": statistics.median(v["median_ms"] for v in runs),
                                    "p10_ms": statistics.median(v["p10_ms"] for v in runs),
                                    "min_ms": min(v["min_ms"] for v in runs), "groups": len(runs)}
                              for key, runs in fp32_runs.items()}
    out["latency_settings"] = {"threads": THREADS, "rounds": rounds, "min_time_s": min_time, "min_runs": 3,
                               "group": group, "seq": spec.latency_seq}


def _accuracy(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("status", "seconds")}


def _accuracy_text(model: str, acc: dict, ref: dict | None = None) -> str:
    if model == "mobilenetv2":
        return f"top-1 agreement {acc['top1_agreement']:.3f}, KL {_fmt(acc['kl'], 4)}, SQNR {acc['sqnr_db']:.1f} dB"
    if model == "minilm":
        return f"cosine mean {acc['cosine_mean']:.4f} (min {acc['cosine_min']:.4f}), SQNR {acc['sqnr_db']:.1f} dB"
    ppl = acc["perplexity"]
    return f"perplexity {_fmt(ppl, 2)}" + (f" (fp32 {ref['perplexity']:.2f})" if ref else f" on {acc['tokens']} tokens")


# ---------------------------------------------------------------------------------------------
# Tables


def table_rows(model: dict) -> tuple[list[str], list[list[str]], list[str]]:
    name = model["model"]
    metrics = {"mobilenetv2": [("top-1 agree", "top1_agreement", 3), ("i.i.d.-noise agree [5-95%]",
                                                                     "iid_noise_agreement", 3), ("KL", "kl", 4),
                               ("SQNR dB", "sqnr_db", 1)],
               "minilm": [("cos mean", "cosine_mean", 4), ("cos min", "cosine_min", 4), ("SQNR dB", "sqnr_db", 1)],
               "smollm2": [("perplexity", "perplexity", 2)]}[name]
    batches = MODELS[name].latency_labels
    header = (["configuration", "status"] + [m[0] for m in metrics]
              + ["size MB", "compile s", "peak GB"] + [f"latency {b} ×fp32" for b in batches])
    notes, rows = [], []
    fp32 = model["fp32"]
    row = ["fp32", "ok"] + [_fmt(fp32["accuracy"].get(m[1]), m[2]) for m in metrics]
    row += [_fmt(fp32["size_bytes"] / MiB, 1), "–", "–"]
    row += [f"1 ({fp32['latency'][b]['median_ms']:.2f} ms)" if b in fp32.get("latency", {}) else "–" for b in batches]
    rows.append(row)
    pre = model.get("ort_preprocess")
    for c in model["configs"]:
        status = c["status"]
        if c.get("error"):
            notes.append(f"{c['id']}: {c['error']}")
            status += f" [{len(notes)}]"
        acc = c.get("accuracy", {})
        compile_s = c.get("compile", {}).get("wall_s")
        if compile_s is not None and c["tool"] == "ort" and c["params"].get("mode") not in WEIGHT_ONLY_MODES and pre \
                and pre.get("wall_s"):
            compile_s += pre["wall_s"]
        peak = c.get("compile", {}).get("peak_rss_bytes")
        row = [c["id"], status] + [_fmt(acc.get(m[1]), m[2]) for m in metrics]
        row += [_fmt(c["size_bytes"] / MiB, 1) if "size_bytes" in c else "–", _fmt(compile_s, 1),
                _fmt(peak / GiB, 2) if peak else "–"]
        for b in batches:
            lat = c.get("latency", {}).get(b)
            row.append(_fmt(lat.get("ratio"), 2) if lat else "–")
        if c.get("latency_error"):
            notes.append(f"{c['id']} latency: {c['latency_error']}")
            row[-1] += f" [{len(notes)}]"
        rows.append(row)
    return header, rows, notes


def quark_lines(quark: dict | None) -> list[str]:
    if not quark:
        return []
    if "error" in quark:
        return [f"* AMD Quark: {quark['error']}"]
    return ["* AMD Quark: `QConfig.get_default_config(PRESET)` (\"-pc\": with `per_channel=True`), then "
            "`ModelQuantizer(config).quantize_model(...)` on the fp32 model with the same calibration samples, in a "
            "venv of its own: " + ", ".join(f"{k} {v}" for k, v in quark["versions"].items())]


ORT_LINES_INT8 = [
    "* ORT static: `quant_pre_process`, then `quantize_static` (QDQ, QUInt8 activations, QInt8 weights); its compile "
    "seconds include `quant_pre_process`. ORT dynamic: `quantize_dynamic` (QInt8 weights) on the pre-processed model. "
    "qcompile: `qcompile.compile(...)` with default options (target ort-cpu), then `save`."]
ORT_LINES_INT4 = [
    "* ORT: `MatMulNBitsQuantizer(model, block_size, is_symmetric, accuracy_level=4, algo_config=...)`, `process()`, "
    "on the fp32 model: DEFAULT without an algo_config (round to nearest), HQQ with `HQQWeightOnlyQuantConfig` "
    "(asymmetric), GPTQ with `GPTQWeightOnlyQuantConfig` on the calibration data (its defaults otherwise); NF4: "
    "`MatMulBnb4Quantizer(model, NF4, block_size)`; FP8: `quant_pre_process` + `quantize_static` (QDQ, "
    "Distribution calibration, QFLOAT8E4M3FN weights per channel and activations). qcompile: "
    "`qcompile.compile(...)` with the options in the configuration's name (target ort-cpu), then `save`; "
    "-acc0: accuracy_level 0 (float products). Latency `token`: one token (every matmul at M = 1, as in decoding)."]


def write_markdown(path: Path, doc: dict) -> None:
    m = doc["machine"]
    family = doc.get("family", "int8").upper()
    lines = [f"# {family}: qcompile vs ONNX Runtime's{' and AMD Quark' if family == 'INT8' else ''} quantizers "
             f"— {doc['date']}", "",
             f"* machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, "
             f"VNNI: {', '.join(m['vnni']) or 'none'} (AVX2 {'yes' if m['avx2'] else 'no'}, "
             f"AVX-512 {'yes' if m['avx512f'] else 'no'})",
             f"* onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, qcompile {m['qcompile']} (commit "
             f"{m.get('commit', 'unknown')}), Python {m['python']}",
             f"* mode: {'quick (smoke run: small sets, few configurations)' if doc['settings']['quick'] else 'full'}; "
             f"child memory cap {doc['settings']['mem_cap_gb']:.0f} GB (RLIMIT_DATA + RSS watchdog), compile time limit "
             f"{doc['settings']['compile_timeout_s']:.0f} s",
             "* accuracy is against the fp32 model on the evaluation split (disjoint from calibration); "
             "latency is ONNX Runtime CPU EP, intra_op_num_threads=2, interleaved rounds, median, as a ratio to fp32",
             *(ORT_LINES_INT4 if family == "INT4" else ORT_LINES_INT8),
             *(quark_lines(doc.get("quark")) if family == "INT8" else []),
             "* peak GB: peak RSS of the quantizing process.", ""]
    for name, model in doc["models"].items():
        header, rows, notes = table_rows(model)
        d = model["data"]
        lines += [f"## {name}", "",
                  f"calibration {d['calibration']['shapes']}, evaluation {d['evaluation']['shapes']}; "
                  f"run {model['run_at']}, {model.get('wall_s', 0) / 60:.1f} min", ""]
        if model.get("ort_preprocess", {}).get("status") not in (None, "ok"):
            lines += [f"ORT quant_pre_process failed: {model['ort_preprocess']['error']}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        if notes:
            lines += [""] + [f"{i}. {note}" for i, note in enumerate(notes, 1)]
        target_db = model["fp32"]["accuracy"].get("sqnr_db_for_target_agreement")
        if target_db is not None:
            lines += ["", f"i.i.d.-noise agree: the top-1 agreement that Gaussian noise on the fp32 logits at the "
                      f"configuration's SQNR would leave (mean and 5-95% band of {NOISE_DRAWS} draws): how far this "
                      f"evaluation set's near-ties allow agreement at that accuracy. A mean of "
                      f"{TARGET_AGREEMENT:.0%} needs {target_db:.1f} dB here."]
        lines.append("")
    path.write_text("\n".join(lines))


def print_tables(doc: dict) -> None:
    from rich.table import Table

    console = CONSOLE or _console()
    for name, model in doc["models"].items():
        header, rows, notes = table_rows(model)
        table = Table(title=f"{name} — {doc.get('family', 'int8').upper()}, {doc['machine']['cpu']}, ORT {doc['machine']['onnxruntime']}")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i < 2 else "right")
        for row in rows:
            style = "red" if row[1].startswith("failed") else "dim" if row[1].startswith("skipped") else None
            table.add_row(*row, style=style)
        console.print(table)
        for i, note in enumerate(notes, 1):
            console.print(f"  [{i}] {note}", soft_wrap=True)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, family: str = "int8") -> int:
    """``family``: which configurations (`FAMILIES`), and the results' name (int4.py runs this with "int4")."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenetv2,minilm,smollm2",
                        help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="smoke run: small data sets, a few configurations")
    parser.add_argument("--configs", help="comma-separated configuration ids or globs (e.g. 'qc-*,ort-static-minmax-pc'); replaces --quick's subset")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--mem-cap-gb", type=float, default=20.0,
                        help="memory cap of each child: RLIMIT_DATA + RSS watchdog (clamped to available memory - 1 GB); default 20")
    parser.add_argument("--compile-timeout", type=float, default=1200.0,
                        help="seconds per quantization (1200; Quark's AdaRound gets at least 3600)")
    parser.add_argument("--eval-timeout", type=float, default=900.0, help="seconds per evaluation (900)")
    parser.add_argument("--latency-timeout", type=float, default=1200.0, help="seconds per latency child (1200)")
    parser.add_argument("--latency-rounds", type=int, default=5, help="interleaved rounds (full run; quick: 3)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--work-dir", type=Path, help="default: <qcompile cache>/bench/<full|quick>")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--suffix", help="appended to the results' file names: a partial run beside a full one of "
                                         "the same day and machine")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)

    configs = FAMILIES[family]()
    if args.list:
        for c in configs:
            notes = ([f"only {', '.join(c.models)}"] if c.models else []) + (
                [f"skipped on {', '.join(c.skip)}"] if c.skip else []) + (["not in --quick"] if c.skip_quick else [])
            notes_text = f"  ({'; '.join(notes)})" if notes else ""
            print(f"{c.id:34s} {'quick ' if c.quick else '      '}{c.label}{notes_text}")
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} (one of {', '.join(MODELS)})")
    chosen = selected(configs, args.quick, args.configs.split(",") if args.configs else None)
    if not chosen and args.configs:
        parser.error(f"--configs {args.configs}: matches none of the configurations (see --list)")

    if any(c.params.get("options", {}).get("kernel") == "custom" or c.params.get("recipe") == "llm-int8"
           for c in chosen):
        from qcompile import kernels

        say(f"  custom-op library: {kernels.build()}")
    available = _meminfo().get("MemAvailable", int(args.mem_cap_gb * GiB))
    args.mem_cap = int(min(args.mem_cap_gb * GiB, max(available - GiB, 2 * GiB)))

    from qcompile.paths import cache_dir

    work_root = args.work_dir or cache_dir() / "bench" / ("quick" if args.quick else "full")
    work_root.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    date = datetime.date.today().isoformat()
    stem = f"{family}-{date}-{machine_slug(machine)}" + ("-quick" if args.quick else "") + (
        f"-{args.suffix}" if args.suffix else "")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.results_dir / f"{stem}.json", args.results_dir / f"{stem}.md"

    say(f"[bold]{family.upper()} benchmark[/] ({'quick' if args.quick else 'full'}): models {', '.join(names)}; "
        f"{len(chosen)} configurations + fp32")
    say(f"  machine: {machine['cpu']}, {machine['cores']} cores, VNNI {', '.join(machine['vnni']) or 'none'}, "
        f"onnxruntime {machine['onnxruntime']}; child memory cap {args.mem_cap / GiB:.1f} GB")
    say(f"  work folder {work_root}; results → {json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path}")

    doc = {"date": date, "family": family, "machine": machine, "models": {}}
    if json_path.is_file():  # same day and machine: a model's old result stays until its new one is in
        try:
            doc["models"] = json.loads(json_path.read_text()).get("models", {})
        except json.JSONDecodeError:
            pass
    doc["settings"] = {"quick": args.quick, "mem_cap_gb": args.mem_cap / GiB, "compile_timeout_s": args.compile_timeout,
                       "threads": THREADS, "configs": [c.id for c in chosen], "work_dir": str(work_root)}
    args.quark = {}
    if any(c.in_quark_venv for c in chosen):
        args.quark = doc["quark"] = quark_venv(cache_dir() / "bench" / QUARK_VENV)
    start = time.monotonic()
    for name in names:
        try:
            doc["models"][name] = bench_model(MODELS[name], args, chosen, work_root)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the others
            traceback.print_exc()
            say(f"[red]{name}: benchmark failed: {_first_lines(exc)}[/]")
            continue
        doc["models"] = dict(sorted(doc["models"].items(), key=lambda kv: list(MODELS).index(kv[0])))
        json_path.write_text(_json(doc))
        write_markdown(md_path, doc)
    doc["wall_s"] = time.monotonic() - start
    if doc["models"]:
        json_path.write_text(_json(doc))
        write_markdown(md_path, doc)
        print_tables(doc)
    say(f"done in {doc['wall_s'] / 60:.1f} min; results: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
