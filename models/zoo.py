"""All model builders by name (INTERFACE.md: `python -m qcompile.models list|build`)."""
from __future__ import annotations

from qcompile.errors import UsageError
from qcompile.models import minilm, mobilenetv2, smollm2, synthetic, synthetic_llama
from qcompile.models.registry import ModelEntry

ZOO: dict[str, ModelEntry] = {e.name: e for e in (mobilenetv2.ENTRY, minilm.ENTRY, smollm2.ENTRY, *synthetic.ENTRIES,
                                                  synthetic_llama.ENTRY)}


def entry(name: str) -> ModelEntry:
    if name not in ZOO:
        raise UsageError(f"unknown model {name!r}; `python -m qcompile.models list` names them")
    return ZOO[name]
