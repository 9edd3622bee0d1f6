"""The compile report on the console (rich)."""
from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qcompile.report import Report


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


def print_compile_summary(report: Report, console: Console) -> None:
    table = Table(title=f"qcompile {report.recipe} -> {report.output}", show_header=False)
    size = report.size_bytes
    table.add_row("size", f"{_mb(size.before)} -> {_mb(size.after)} ({size.after / size.before:.2f}x)"
                  if size.after else _mb(size.before))
    table.add_row("passes", f"{sum(p.seconds for p in report.passes):.2f} s, "
                            f"{sum(p.modified for p in report.passes)}/{len(report.passes)} modified")
    if report.peak_memory_bytes:
        table.add_row("memory", f"peak {report.peak_memory_bytes / 1e9:.2f} GB")
    precisions = Counter(layer.precision for layer in report.layers)
    table.add_row("layers", ", ".join(f"{n} x {p}" for p, n in precisions.items()) or "none")
    verification = report.verification
    if verification:
        for o in verification.outputs:
            agreement = "" if o.argmax_agreement is None else f", same argmax {o.argmax_agreement:.1%}"
            table.add_row(f"output {o.name}", f"SQNR {o.sqnr_db:.1f} dB, cosine {o.cosine:.5f}, "
                                              f"max |err| {o.max_abs:.3g}{agreement}")
        for lat in verification.latency_ms or ():
            table.add_row(f"latency batch {lat.batch}", f"{lat.reference:.2f} ms -> {lat.candidate:.2f} ms "
                                                        f"({lat.ratio:.2f}x fp32)")
        if verification.latency_note:
            table.add_row("latency", escape(verification.latency_note))
        if (ppl := verification.perplexity) is not None:
            table.add_row("perplexity", f"{ppl['reference']:.3f} -> {ppl['candidate']:.3f} ({ppl['ratio']:.3f}x, "
                                        f"{ppl['predicted']} tokens)")
        table.add_row("checked on", verification.runtime)
    for note in report.notes:
        table.add_row("note", escape(note))
    console.print(table)
