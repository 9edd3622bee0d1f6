"""English text for calibration and evaluation: the licence texts every Debian system ships.

Calibration and evaluation use different documents, so an evaluation never sees calibration text.
"""
from __future__ import annotations

import re
from pathlib import Path

from qcompile.errors import UsageError

LICENSES = Path("/usr/share/common-licenses")
CALIBRATION_DOCUMENTS = ("Apache-2.0", "MPL-2.0", "Artistic", "GFDL-1.3", "LGPL-2.1")
EVALUATION_DOCUMENTS = ("GPL-3",)


def corpus(split: str) -> str:
    """The whole text of the ``calibration`` or ``evaluation`` split, whitespace normalized."""
    names = {"calibration": CALIBRATION_DOCUMENTS, "evaluation": EVALUATION_DOCUMENTS}[split]
    texts = []
    for name in names:
        path = LICENSES / name
        if not path.is_file():
            raise UsageError(f"{path}: missing; the text data sets need Debian's base-files licence texts")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return re.sub(r"\s+", " ", "\n".join(texts)).strip()


def sentences(split: str, min_words: int = 6) -> list[str]:
    """Sentences of the split, in document order, dropping fragments shorter than ``min_words``."""
    parts = re.split(r"(?<=[.;:!?])\s+", corpus(split))
    return [p for p in parts if len(p.split()) >= min_words]
