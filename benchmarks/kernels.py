#!/usr/bin/env python
"""Kernel benchmark: qcompile's BlockQuantMatMul next to ONNX Runtime's MatMulNBits (accuracy_level 4 and 0), int8
DynamicQuantizeMatMul and fp32 MatMul; BlockQuantMatMul on NF4 (code book, 8-bit absmax in groups of 256 columns)
next to ONNX Runtime's MatMulBnb4 (float absmax); qcompile's OutlierSplitMatMul (LLM.int8()) next to
DynamicQuantizeMatMul and its own standard-ONNX equivalent; one matmul at a time, in one run.

    .venv/bin/python benchmarks/kernels.py [--quick] [--rounds 7]
    .venv/bin/python benchmarks/kernels.py --instructions [--quick]    # instruction counts instead of times
    .venv/bin/python benchmarks/kernels.py --markdown RESULTS.json     # rewrite its .md

Shapes: K = N = 4096 and SmolLM2-135M's (q/o 576x576, k/v 576x192, gate/up 576x1536, down 1536x576, head
576x49152), M = 1 (one-token decode) and M = 128 (prefill), INT4 blocks of 32 and 128, symmetric, 2 threads.
Each model holds enough copies of its weight, one node each, that they do not fit the last-level cache together,
so every node reads its weight from memory; a node's time is the model's divided by the copies. Configurations
are timed in turns (medians of ``--rounds``; threads do not spin between runs, `qcompile.session.TIMING`). The
read-bandwidth floor (the weight's bytes over the memory bandwidth measured in the same run by two threads
reading 512 MB) is printed beside each. Results:
``benchmarks/results/kernels-<date>-<machine>.json`` and ``.md``.

Wall times on shared machines are noisy; ``--instructions`` counts instructions per call instead (valgrind's
callgrind, one thread, block 32, one weight copy: `count_instructions`), into ``kernels-...-instructions.*``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import int8

THREADS = 2
STREAM_BYTES = 96 << 20  # weights per model: three times a 32 MB last-level cache
SHAPES = {"4096x4096": (4096, 4096), "smollm2 q/o 576x576": (576, 576), "smollm2 k/v 576x192": (576, 192),
          "smollm2 gate/up 576x1536": (576, 1536), "smollm2 down 1536x576": (1536, 576),
          "smollm2 head 576x49152": (576, 49152)}
QUICK_SHAPES = ("4096x4096", "smollm2 gate/up 576x1536")
NF4_SCALE_BLOCK = 256  # QLoRA's (and the nf4 recipe's) absmax values per 8-bit scale
COUNTED_KINDS = ("custom", "nbits-acc4", "int8", "fp32", "custom-nf4", "bnb4", "outlier-split")
# What callgrind counts: one call of this C function (built by `count_instructions`) through ctypes, i.e. libffi's
# ffi_call, with the Python body it calls back (valgrind names no symbol of so small a library; ffi_call it does).
MEASURE_SOURCE = "void qcompile_measure(void (*body)(void)) { body(); }\n"


def read_bandwidth(seconds: float = 1.0) -> float:
    """Bytes per second two threads read from a 512 MB array (each half, reduced by bitwise or: the cheapest
    reduction numpy has), the median of several. A lower bound of the machine's: the reduction costs too."""
    data = np.ones(64 << 20, np.uint64)
    halves = np.array_split(data, THREADS)
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        threads = [threading.Thread(target=np.bitwise_or.reduce, args=(half,)) for half in halves]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rates.append(data.nbytes / (time.perf_counter() - start))
    return statistics.median(rates)


def _weights(kind: str, k: int, n: int, block: int, rng: np.random.Generator) -> tuple[list[np.ndarray], dict, int]:
    """One copy of the weight as ``kind`` stores it: initializers, node attributes, bytes read per call."""
    k_blocks = -(-k // block)
    if kind == "fp32":
        arrays = [rng.standard_normal((k, n)).astype(np.float32)]
        return arrays, {}, arrays[0].nbytes
    if kind == "int8":
        arrays = [rng.integers(-127, 128, (k, n), dtype=np.int8), rng.uniform(0.01, 0.02, n).astype(np.float32)]
        return arrays, {}, sum(a.nbytes for a in arrays)
    if kind == "outlier-split":
        arrays = [rng.integers(1, 256, (n, k), dtype=np.uint8), rng.uniform(0.01, 0.02, n).astype(np.float32)]
        return arrays, {"K": k, "N": n, "threshold": 6.0}, sum(a.nbytes for a in arrays)
    if kind == "bnb4":  # MatMulBnb4: the (N, K) weight's codes flattened, a float absmax per block
        arrays = [rng.integers(0, 256, n * k // 2, dtype=np.uint8),
                  rng.uniform(0.5, 2.0, n * k_blocks).astype(np.float32)]
        return arrays, {"K": k, "N": n, "block_size": block, "quant_type": 1}, sum(a.nbytes for a in arrays)
    if kind == "custom-nf4":  # codes, the code book, absmax levels with a scale and zero point per 256 columns
        from qcompile.ops import block_quant_matmul

        b, scales, _, book = block_quant_matmul.random_weight(rng, K=k, N=n, bits=4, block_size=block, symmetric=True,
                                                              code_book=True, scale_block=NF4_SCALE_BLOCK)
        arrays = [b, book, scales.levels, scales.scales, scales.zero_points]
        attributes = {"K": k, "N": n, "bits": 4, "block_size": block, "scale_block": NF4_SCALE_BLOCK}
        return arrays, attributes, sum(a.nbytes for a in arrays)
    arrays = [rng.integers(0, 256, (n, k_blocks, block // 2), dtype=np.uint8),
              rng.uniform(0.01, 0.02, n * k_blocks).astype(np.float32)]
    return arrays, {"K": k, "N": n, "bits": 4, "block_size": block}, sum(a.nbytes for a in arrays)


def _node(kind: str, i: int, attributes: dict) -> onnx.NodeProto:
    inputs = ["A", *[f"w{i}_{j}" for j in range(2 if kind != "fp32" else 1)]]
    if kind == "custom-nf4":  # no float scales, no zero points
        return helper.make_node("BlockQuantMatMul", ["A", f"w{i}_0", "", "", *[f"w{i}_{j}" for j in range(1, 5)]],
                                [f"y{i}"], domain="ai.qcompile", **attributes)
    if kind == "bnb4":
        return helper.make_node("MatMulBnb4", inputs, [f"y{i}"], domain="com.microsoft", **attributes)
    if kind == "fp32":
        return helper.make_node("MatMul", inputs, [f"y{i}"])
    if kind == "int8":
        return helper.make_node("DynamicQuantizeMatMul", inputs, [f"y{i}"], domain="com.microsoft")
    if kind == "custom":
        return helper.make_node("BlockQuantMatMul", inputs, [f"y{i}"], domain="ai.qcompile", **attributes)
    if kind == "outlier-split":
        return helper.make_node("OutlierSplitMatMul", inputs, [f"y{i}"], domain="ai.qcompile", **attributes)
    level = {"nbits-acc4": 4, "nbits-acc0": 0}[kind]
    return helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain="com.microsoft", accuracy_level=level,
                            **attributes)


def build(kind: str, k: int, n: int, block: int, folder: Path, rng: np.random.Generator,
          stream: bool = True) -> tuple[Path, int, int]:
    """A model of ``copies`` nodes of ``kind``, each on a weight of its own (random, so that no runtime can share
    them; one node unless ``stream``): (path, copies, bytes per node). `outlier-decomposed`: OutlierSplitMatMul's
    standard-ONNX equivalent, one copy (its weight is float: large enough)."""
    path = folder / f"{kind}-{k}x{n}-b{block}.onnx"
    if kind == "outlier-decomposed":
        from qcompile.ops import outlier_split_matmul

        b, scales = outlier_split_matmul.random_weight(rng, K=k, N=n)
        onnx.save(outlier_split_matmul.decomposed_model(b, scales, K=k, N=n), path)
        return path, 1, k * n * 4
    arrays, attributes, nbytes = _weights(kind, k, n, block, rng)
    copies = max(2, -(-STREAM_BYTES // nbytes)) if stream else 1
    nodes, initializers = [], []
    for i in range(copies):
        nodes.append(_node(kind, i, attributes))
        initializers += [numpy_helper.from_array(a, f"w{i}_{j}") for j, a in enumerate(arrays)]
        arrays = _weights(kind, k, n, block, rng)[0]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n])
                               for i in range(copies)], initializers)
    opsets = [helper.make_opsetid(domain, 21 if domain == "" else 1) for domain in ("", "com.microsoft", "ai.qcompile")]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path, save_as_external_data=True,
              location=path.name + ".data")
    return path, copies, nbytes


def time_interleaved(sessions: dict, feeds: dict, rounds: int) -> dict[str, float]:
    """Seconds per call of each session, the median over ``rounds`` turns in which each runs once."""
    times = {name: [] for name in sessions}
    for name, sess in sessions.items():  # warm up: first runs allocate
        sess.run(None, feeds[name])
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _features(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """Activations (m, k), 1 in 500 input features 20x larger (LLM.int8()'s outliers)."""
    a = rng.standard_normal((m, k)).astype(np.float32)
    a[:, rng.choice(k, size=max(k // 500, 1), replace=False)] *= 20
    return a


def count_instructions(library: Path, shapes, rng: np.random.Generator) -> list[dict]:
    """Instructions per call of each of `COUNTED_KINDS` at M = 1 and 128 (blocks of 32), counted by valgrind's
    callgrind in a child process running one thread: each measured call runs inside `MEASURE_SOURCE`'s function,
    called through ctypes (the child's only foreign calls: callgrind counts what runs inside ffi_call, and dumps
    each call apart); an Identity model's count (the Python call's own cost) is subtracted. Valgrind shows the programs it runs no AVX-512, so ONNX Runtime's kernels and ours take their AVX2
    paths: these are an AVX2 machine's counts."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(folder / "measure.so"), "-x", "c", "-"],
                       input=MEASURE_SOURCE, text=True, check=True)
        identity = folder / "identity.onnx"
        onnx.save(helper.make_model(helper.make_graph(
            [helper.make_node("Identity", ["A"], ["Y"])], "identity",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", "k"])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", "k"])])), identity)
        plan = [{"kind": "baseline", "shape": "", "k": 8, "m": 1, "path": str(identity)}]
        for shape in shapes:
            k, n = SHAPES[shape]
            for kind in COUNTED_KINDS:
                path = build(kind, k, n, 32, folder, rng, stream=False)[0]
                plan += [{"kind": kind, "shape": shape, "k": k, "m": m, "path": str(path)} for m in (1, 128)]
        (folder / "plan.json").write_text(json.dumps(plan))
        out = folder / "callgrind.out"
        child = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
                                "--toggle-collect=ffi_call", "--dump-after=ffi_call", sys.executable,
                                __file__, "--count-child", str(folder), str(library)], capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"callgrind's child failed:\n{child.stderr[-3000:]}")
        dumps = sorted(folder.glob("callgrind.out.*"), key=lambda path: int(path.suffix[1:]))
        if len(dumps) != len(plan):
            raise SystemExit(f"callgrind dumped {len(dumps)} calls, expected {len(plan)} (one per measured call)")
        totals = [_callgrind_total(dump) for dump in dumps]
    return [{key: item[key] for key in ("kind", "shape", "m")} | {"instructions": total - totals[0]}
            for item, total in zip(plan[1:], totals[1:])]


def _callgrind_total(dump: Path) -> int:
    return next(int(line.split()[1]) for line in dump.read_text().splitlines() if line.startswith("totals:"))


def count_child(folder: Path, library: Path) -> int:
    """`count_instructions`' child (run under callgrind): each planned model run once to warm up, then once inside
    the measuring function."""
    import ctypes

    import onnxruntime as ort

    measure = ctypes.CDLL(str(folder / "measure.so")).qcompile_measure
    body_type = ctypes.CFUNCTYPE(None)
    rng = np.random.default_rng(0)
    for item in json.loads((folder / "plan.json").read_text()):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.register_custom_ops_library(str(library))
        session = ort.InferenceSession(item["path"], options, providers=["CPUExecutionProvider"])
        feed = {"A": _features(rng, item["m"], item["k"])}
        session.run(None, feed)  # first runs allocate
        measure(body_type(lambda: session.run(None, feed)))
    return 0


def instructions_main(quick: bool) -> int:
    from qcompile import kernels

    library = kernels.build()
    machine = int8.machine_info()
    shapes = ("smollm2 gate/up 576x1536",) if quick else QUICK_SHAPES
    int8.say(f"instruction counts (callgrind, AVX2 paths, 1 thread): {', '.join(shapes)}; several minutes")
    rows = count_instructions(library, shapes, np.random.default_rng(0))
    date = datetime.date.today().isoformat()
    stem = f"kernels-{date}-{int8.machine_slug(machine)}-instructions" + ("-quick" if quick else "")
    doc = {"date": date, "machine": machine, "instructions": rows}
    int8.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (int8.RESULTS_DIR / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (int8.RESULTS_DIR / f"{stem}.md").write_text(markdown(doc))
    int8.say(f"results: benchmarks/results/{stem}.md")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help=f"shapes {', '.join(QUICK_SHAPES)}, block 32 only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per call (valgrind's callgrind) instead of timing")
    args = parser.parse_args()
    if args.instructions:
        return instructions_main(args.quick)

    import qcompile
    from qcompile import kernels
    from qcompile.session import TIMING

    library = kernels.build()
    machine = int8.machine_info()
    int8.say(f"kernel benchmark: {machine['cpu']}, {machine['cores']} cores, VNNI "
             f"{', '.join(machine['vnni']) or 'none'}, onnxruntime {machine['onnxruntime']}, qcompile kernel path "
             f"{kernels.cpu_isas()[0]}; library {library}")
    bandwidth = read_bandwidth()
    int8.say(f"read bandwidth (2 threads): {bandwidth / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    int4_kinds = ("custom", "nbits-acc4", "nbits-acc0", "int8", "fp32", "custom-nf4", "bnb4")
    outlier_kinds = ("outlier-split", "outlier-decomposed")  # LLM.int8(): no blocks, timed with the first block
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        k, n = SHAPES[shape]
        for block in (32,) if args.quick else (32, 128):
            kinds = int4_kinds + (outlier_kinds if block == 32 else ())
            with tempfile.TemporaryDirectory() as folder:
                built = {kind: build(kind, k, n, block, Path(folder), rng) for kind in kinds}
                sessions = {kind: qcompile.session(path, threads=THREADS, config=TIMING)
                            for kind, (path, _, _) in built.items()}
                for m in (1, 128):
                    a = _features(rng, m, k)
                    feeds = {kind: {"A": a[None] if kind == "outlier-decomposed" else a} for kind in kinds}
                    seconds = time_interleaved(sessions, feeds, args.rounds)
                    row = {"shape": shape, "k": k, "n": n, "block": block, "m": m}
                    for kind, (_, copies, nbytes) in built.items():
                        row[kind] = {"ms": seconds[kind] / copies * 1e3, "bytes": nbytes,
                                     "floor_ms": nbytes / bandwidth * 1e3}
                    rows.append(row)
                    int8.say(f"  {shape} b{block} M={m}: " + ", ".join(
                        f"{kind} {row[kind]['ms']:.3f} ms" for kind in kinds) +
                        f"; INT4 floor {row['custom']['floor_ms']:.3f} ms")
                del sessions
    date = datetime.date.today().isoformat()
    stem = f"kernels-{date}-{int8.machine_slug(machine)}" + ("-quick" if args.quick else "")
    doc = {"date": date, "machine": machine, "threads": THREADS, "read_bandwidth_gbps": bandwidth / 1e9,
           "kernel_path": kernels.cpu_isas()[0], "rows": rows}
    int8.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (int8.RESULTS_DIR / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (int8.RESULTS_DIR / f"{stem}.md").write_text(markdown(doc))
    int8.say(f"results: benchmarks/results/{stem}.md")
    return 0


def markdown(doc: dict) -> str:
    if "instructions" in doc:
        return instructions_markdown(doc)
    machine = doc["machine"]
    lines = [f"# Kernel benchmark, {doc['date']}", "",
             f"{machine['cpu']}, {machine['cores']} cores, VNNI {', '.join(machine['vnni']) or 'none'}, onnxruntime "
             f"{machine['onnxruntime']}, qcompile commit {machine['commit']}, {doc['threads']} threads; qcompile's "
             f"kernel path: {doc['kernel_path']}. "
             f"Read bandwidth measured in the run: {doc['read_bandwidth_gbps']:.1f} GB/s. Milliseconds per matmul "
             f"(median), weights read from memory; `floor` = the INT4 weight's bytes (levels and scales) over "
             f"that bandwidth. Ratios: to qcompile's BlockQuantMatMul (`custom`).", "",
             "| shape | block | M | custom | floor | MatMulNBits acc 4 | MatMulNBits acc 0 "
             "| int8 DynamicQuantizeMatMul | fp32 MatMul |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in doc["rows"]:
        ours = row["custom"]["ms"]
        cells = _ratio_cells(row, ours, ("nbits-acc4", "nbits-acc0", "int8", "fp32"))
        lines.append(f"| {row['shape']} | {row['block']} | {row['m']} | {ours:.3f} | "
                     f"{row['custom']['floor_ms']:.3f} | " + " | ".join(cells) + " |")
    nf4 = [row for row in doc["rows"] if "custom-nf4" in row]
    if nf4:
        lines += ["", "NF4: qcompile's BlockQuantMatMul with the code book (int8 levels) and 8-bit absmax (a scale and "
                      "zero point per 256 columns, decoded as each column is read), activations int8 per block, "
                      "against ONNX Runtime's MatMulBnb4 (float absmax, float activations). `floor`: the NF4 "
                      "weight's bytes over the bandwidth. Ratios: to BlockQuantMatMul.", "",
                  "| shape | block | M | BlockQuantMatMul NF4 | floor | MatMulBnb4 | fp32 MatMul |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in nf4:
            ours = row["custom-nf4"]["ms"]
            cells = _ratio_cells(row, ours, ("bnb4", "fp32"))
            lines.append(f"| {row['shape']} | {row['block']} | {row['m']} | {ours:.3f} | "
                         f"{row['custom-nf4']['floor_ms']:.3f} | " + " | ".join(cells) + " |")
    outliers = [row for row in doc["rows"] if "outlier-split" in row]
    if outliers:
        lines += ["", "LLM.int8(): qcompile's OutlierSplitMatMul (threshold 6; 1 in 500 input features 20x larger, "
                      "so found as outliers), against int8 DynamicQuantizeMatMul and the op's standard-ONNX "
                      "equivalent (`decomposed`, float weight, one copy). Ratios: to OutlierSplitMatMul.", "",
                  "| shape | M | OutlierSplitMatMul | int8 DynamicQuantizeMatMul | decomposed | fp32 MatMul |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in outliers:
            ours = row["outlier-split"]["ms"]
            cells = _ratio_cells(row, ours, ("int8", "outlier-decomposed", "fp32"))
            lines.append(f"| {row['shape']} | {row['m']} | {ours:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio_cells(row: dict, ours: float, kinds: tuple[str, ...]) -> list[str]:
    """Each kind's milliseconds in ``row`` and its time as a ratio to ``ours``."""
    return [f"{row[kind]['ms']:.3f} ({row[kind]['ms'] / ours:.2f}x)" for kind in kinds]


def instructions_markdown(doc: dict) -> str:
    machine = doc["machine"]
    names = {"custom": "BlockQuantMatMul INT4", "nbits-acc4": "MatMulNBits acc 4", "int8": "int8 DynamicQuantizeMatMul",
             "fp32": "fp32 MatMul", "custom-nf4": "BlockQuantMatMul NF4", "bnb4": "MatMulBnb4",
             "outlier-split": "OutlierSplitMatMul"}
    lines = [f"# Kernel instruction counts, {doc['date']}", "",
             f"Counted by valgrind's callgrind on {machine['cpu']} (onnxruntime {machine['onnxruntime']}, qcompile "
             f"commit {machine['commit']}), one thread, blocks of 32, one call after a warm-up; the Python call's own "
             f"count subtracted. Valgrind shows no AVX-512, so every kernel ran its AVX2 path: these are an AVX2 "
             f"machine's counts. Millions of instructions per call; ratios to BlockQuantMatMul INT4.", "",
             "| shape | M | " + " | ".join(names.values()) + " |", "| --- | ---: |" + " ---: |" * len(names)]
    for shape in dict.fromkeys(row["shape"] for row in doc["instructions"]):
        for m in (1, 128):
            counts = {row["kind"]: row["instructions"] for row in doc["instructions"]
                      if row["shape"] == shape and row["m"] == m}
            ours = counts["custom"]
            cells = [f"{counts[kind] / 1e6:.2f}" + ("" if kind == "custom" else f" ({counts[kind] / ours:.2f}x)")
                     for kind in names]
            lines.append(f"| {shape} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--count-child":
        raise SystemExit(count_child(Path(sys.argv[2]), Path(sys.argv[3])))
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":  # rewrite a results file's .md from its .json
        source = Path(sys.argv[2])
        source.with_suffix(".md").write_text(markdown(json.loads(source.read_text())))
        raise SystemExit(0)
    raise SystemExit(main())
