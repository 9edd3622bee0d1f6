"""Progress display for long work, routed through one rich console owned by the CLI.

Library code calls `task(...)` and `track(...)`; when no display is active (the Python API, tests,
`--quiet`), they cost nothing and print nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

T = TypeVar("T")
_active: Progress | None = None


@contextlib.contextmanager
def display(console) -> Iterator[None]:
    """Show progress bars on ``console`` while the block runs."""
    global _active
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )
    _active = bar
    try:
        with bar:
            yield
    finally:
        _active = None


@contextlib.contextmanager
def task(description: str, total: int | None):
    """A progress task; yields a function that advances it by one step."""
    bar = _active
    if bar is None:
        yield lambda steps=1: None
        return
    task_id = bar.add_task(description, total=total, status="")
    try:
        yield lambda steps=1: bar.advance(task_id, steps)
    finally:
        bar.remove_task(task_id)


def status(text: str) -> None:
    """Set the status text of the newest task (e.g. the pass that is running)."""
    if _active is not None and _active.tasks:
        _active.update(_active.tasks[-1].id, status=text)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as advance:
        for item in items:
            yield item
            advance()
