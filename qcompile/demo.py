"""`make demo`: build the default real model, compile it with the best recipe we have, verify, summarize."""
from __future__ import annotations

import sys

import numpy as np
from rich.console import Console
from rich.table import Table

import qcompile
from qcompile import progress
from qcompile.errors import UsageError
from qcompile.paths import cache_dir
from qcompile.session import session

MODEL = "mobilenetv2"
RECIPE = "w8a8"  # the best recipe built so far
CALIBRATION_IMAGES = 64
EVAL_IMAGES = 64


def top1_agreement(reference, candidate, pixels: np.ndarray) -> float:
    ref, cand = session(reference), session(candidate)
    agree = 0
    for start in range(0, len(pixels), 8):
        batch = {"pixel_values": pixels[start:start + 8]}
        agree += int(np.sum(ref.run(None, batch)[0].argmax(-1) == cand.run(None, batch)[0].argmax(-1)))
    return agree / len(pixels)


def main() -> int:
    from qcompile.models import mobilenetv2
    from qcompile.models.registry import build_cached

    console = Console(highlight=False)
    try:
        console.print(f"[bold]qcompile demo[/]: {MODEL} ({mobilenetv2.PACKAGE.distribution}), recipe {RECIPE}, "
                      f"calibrated on {CALIBRATION_IMAGES} and evaluated on {EVAL_IMAGES} disjoint images")
        model_path = build_cached(mobilenetv2.ENTRY)
        work = cache_dir() / "demo"
        work.mkdir(parents=True, exist_ok=True)
        calib_path, data_path = work / "mobilenetv2-calibration.npz", work / "mobilenetv2-evaluation.npz"
        np.savez(calib_path, **mobilenetv2.image_data("calibration", CALIBRATION_IMAGES))
        pixels = mobilenetv2.image_data("evaluation", EVAL_IMAGES)["pixel_values"]
        np.savez(data_path, pixel_values=pixels)
        output = work / f"{MODEL}.{RECIPE}.onnx"
        with progress.display(Console(stderr=True)):
            result = qcompile.compile(model_path, recipe=RECIPE, calib=str(calib_path))
            result.save(output)
            verification = result.verify(str(data_path))
        agreement = top1_agreement(model_path, output, pixels)
    except UsageError as exc:
        Console(stderr=True).print(f"demo: error: {exc}", markup=False)
        return 2

    report = result.report
    (logits,) = verification["outputs"]
    table = Table(title=f"{MODEL}: fp32 vs qcompile {RECIPE}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("size on disk", f"{report['size_bytes']['before'] / 1e6:.2f} MB -> "
                                  f"{report['size_bytes']['after'] / 1e6:.2f} MB")
    table.add_row("top-1 agreement with fp32", f"{agreement:.1%}")
    table.add_row("logits SQNR / cosine", f"{logits['sqnr_db']:.1f} dB / {logits['cosine']:.5f}")
    for latency in verification["latency_ms"]:
        table.add_row(f"latency at batch {latency['batch']} (ORT CPU)",
                      f"{latency['reference']:.1f} ms -> {latency['candidate']:.1f} ms ({latency['ratio']:.2f}x)")
    table.add_row("compile time", f"{sum(p['seconds'] for p in report['passes']):.2f} s")
    table.add_row("output", str(output))
    console.print(table)
    cpu = report.get("cpu")
    if cpu:
        console.print(f"ort-cpu weights: {cpu['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
