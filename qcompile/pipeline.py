"""Runs an ordered list of passes with the instruments every compile gets.

Instruments (TVM's pass instruments, MLIR's verifier-after-each-pass):
* timing and `modified` per pass, kept as `PassRecord`s for the report;
* provenance: each node a pass creates gets ``qcompile.created_by = <pass>`` in its metadata, each node
  it changes gets the pass appended to ``qcompile.changed_by``; both are saved in the ONNX file, so
  `qcompile diff` can say which pass did what;
* `verify_each`: the ONNX checker (full_check) plus our own invariants after every pass;
* `dump_after`: the model saved after the named passes;
* a progress display (rich) that long passes report into through `qcompile.progress`.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from qcompile import progress
from qcompile.decisions.keys import CHANGED_BY, CREATED_BY
from qcompile.errors import UsageError
from qcompile.graph import all_nodes
from qcompile.invariants import verify_model
from qcompile.notes import notes
from qcompile.report import PassRecord

logger = logging.getLogger(__name__)


def pass_name(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", type(p).__name__)


@dataclass
class Pipeline:
    passes: Sequence[ir.passes.PassBase]
    # Also switched on by QCOMPILE_VERIFY_EACH=1, which the test suite sets.
    verify_each: bool = False
    dump_after: Callable[[str, ir.Model], None] | None = None

    def run(self, model: ir.Model) -> list[PassRecord]:
        # A pass that can tell from the input model that it will refuse it says so before any pass runs
        # (calibration can take minutes).
        for p in self.passes:
            if hasattr(p, "check_input"):
                p.check_input(model)
        records = []
        with progress.task("compiling", total=len(self.passes)) as advance:
            for p in self.passes:
                name = pass_name(p)
                progress.status(name)
                before = _signatures(model)
                notes_before = len(notes(model))
                start = time.perf_counter()
                try:
                    result = p(model)
                except ir.passes.PreconditionError as exc:  # a model this pass cannot take: the user's to fix
                    if isinstance(exc.__cause__, UsageError):
                        raise exc.__cause__ from None
                    raise
                seconds = time.perf_counter() - start
                if result.model is not model:
                    raise TypeError(f"pass {name} returned a new model; qcompile passes work in place")
                if result.modified:
                    _record_provenance(model, before, name)
                if self.verify_each or os.environ.get("QCOMPILE_VERIFY_EACH") == "1":
                    verify_model(model, after=name)
                records.append(PassRecord(name, seconds, result.modified, notes(model)[notes_before:]))
                logger.info("%s: %.3f s, modified=%s", name, seconds, result.modified)
                if self.dump_after is not None:
                    self.dump_after(name, model)
                advance()
        return records


def _signature(node: ir.Node) -> tuple:
    attrs = tuple(
        (key, repr(attr.value))
        for key, attr in node.attributes.items()
        if attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    )
    # Input Values are compared by identity: rewiring a node to another value is a change.
    return (node.op_type, node.domain, tuple(node.inputs), attrs)


def _signatures(model: ir.Model) -> dict[ir.Node, tuple]:
    return {node: _signature(node) for node in all_nodes(model)}


def _record_provenance(model: ir.Model, before: dict[ir.Node, tuple], name: str) -> None:
    for node in all_nodes(model):
        old = before.get(node)
        if old is None:
            node.metadata_props.setdefault(CREATED_BY, name)
        elif old != _signature(node):
            changed = node.metadata_props.get(CHANGED_BY)
            passes = changed.split(",") if changed else []
            if name not in passes:
                node.metadata_props[CHANGED_BY] = ",".join([*passes, name])


def dump_to_folder(folder: Path, stem: str, wanted: set[str]) -> Callable[[str, ir.Model], None]:
    """A `dump_after` hook that saves a copy of the model after each pass named in ``wanted``; a pass that
    runs again (infer-shapes) is dumped each time, as ``after-NAME``, ``after-NAME-2``, ..."""
    from qcompile.io import save_model

    runs: Counter[str] = Counter()

    def dump(name: str, model: ir.Model) -> None:
        if name in wanted:
            runs[name] += 1
            suffix = f"-{runs[name]}" if runs[name] > 1 else ""
            path = folder / f"{stem}.after-{name}{suffix}.onnx"
            save_model(model, path)
            logger.info("dumped the model after %s to %s", name, path)

    return dump
