"""Notes that passes leave for the report: what they left alone and why.

A pass calls `add_note(model, "...")`; the pipeline attributes each note to the pass that wrote it. A
note already made (two passes that leave the same thing alone) is not repeated.
"""
from __future__ import annotations

import onnx_ir as ir

from qcompile.decisions.keys import NOTES_KEY


def add_note(model: ir.Model, message: str) -> None:
    made = model.meta.setdefault(NOTES_KEY, [])
    if message not in made:
        made.append(message)


def notes(model: ir.Model) -> list[str]:
    return list(model.meta.get(NOTES_KEY, []))


def some_names(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, and "..." where there are more: for a note's list."""
    return f"{', '.join(names[:shown])}{', ...' if len(names) > shown else ''}"
