"""Perplexity of decoder language models on a text file, for `qcompile eval --text FILE --tokenizer FILE`.

The text is tokenized with the model's tokenizer (a Hugging Face ``tokenizer.json``, read by the `tokenizers`
package) and scored over sliding windows of ``window`` tokens moved by ``stride``: every token after the first
is predicted exactly once, with at least ``window - stride`` tokens of context (the first window's tokens with
fewer), as Hugging Face's perplexity guide does. Perplexity is exp of the mean
negative log-likelihood of those predictions. Both models see the same windows, so their logits are compared
too (SQNR, cosine, same top token).

The model takes ``input_ids`` [batch, seq] and, if it has them, ``attention_mask`` (all ones) and
``position_ids`` (0, 1, ...); it writes ``logits`` [batch, seq, vocab] (the output of that name, else its
first of rank 3). Models that also take a key/value cache as inputs are refused.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qcompile import progress
from qcompile.errors import UsageError
from qcompile.session import run
from qcompile.verify import OutputAccumulator

DEFAULT_WINDOW, DEFAULT_STRIDE = 512, 256
_FILLED_INPUTS = ("attention_mask", "position_ids")


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` in ``path`` (a tokenizer.json)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the tokenizers package: pip install tokenizers") from None
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type for files it cannot parse
        raise UsageError(f"{path}: not a tokenizer.json the tokenizers package reads: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def token_ids(text_path: str | Path, tokenizer) -> np.ndarray:
    """The ids of the text in ``text_path``, as the tokenizer encodes it (its own special tokens included)."""
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{text_path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{text_path}: cannot read it as UTF-8 text: {exc}") from None
    ids = np.array(tokenizer.encode(text).ids, dtype=np.int64)
    if ids.size < 2:
        raise UsageError(f"{text_path}: {ids.size} token(s); perplexity needs at least 2")
    return ids


def windows(count: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, scored): windows over ``count`` tokens whose last ``scored`` positions are predicted here
    and nowhere else (each position predicts the next token); after the first window each predicts ``stride``
    tokens with ``window - stride`` before them."""
    if not 0 < stride < window:
        raise UsageError(f"--stride {stride}: expected 1 to {window - 1} (--window {window} less one token of context)")
    stop = min(window, count)
    yield 0, stop, stop - 1  # the first token is never predicted
    while stop < count:
        scored_until, stop = stop, min(stop + stride, count)
        yield max(stop - window, 0), stop, stop - scored_until


class LanguageModel:
    """A session of a decoder LM and the feeds it takes."""

    def __init__(self, session, path: str):
        self.session, self.path = session, path
        inputs = [i.name for i in session.get_inputs()]
        if "input_ids" not in inputs or set(inputs) - {"input_ids", *_FILLED_INPUTS}:
            raise UsageError(f"{path}: perplexity needs a model whose inputs are input_ids (and attention_mask, "
                             f"position_ids); it takes {', '.join(inputs)}")
        self.inputs = inputs
        outputs = session.get_outputs()
        named = [o for o in outputs if o.name == "logits"] or [o for o in outputs if len(o.shape or ()) == 3]
        if not named:
            raise UsageError(f"{path}: no logits output [batch, seq, vocab] among {', '.join(o.name for o in outputs)}")
        self.logits = named[0].name
        vocab = named[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) and vocab > 0 else None

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Logits [seq, vocab] of one window of ids [seq], as float64."""
        feed = {"input_ids": ids[None]}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones_like(feed["input_ids"])
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        logits = run(self.session, [self.logits], feed, f"{self.path} on the text")[0]
        return np.asarray(logits, dtype=np.float64)[0]


def negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each row of ``logits`` [n, vocab] (log-sum-exp from the row's max)."""
    peak = logits.max(axis=-1)
    log_norm = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
    return log_norm - logits[np.arange(len(targets)), targets]


@dataclass
class _Score:
    total: float = 0.0
    count: int = 0

    def add(self, logits: np.ndarray, targets: np.ndarray) -> None:
        self.total += float(negative_log_likelihoods(logits, targets).sum())
        self.count += len(targets)

    @property
    def perplexity(self) -> float:
        return math.exp(self.total / self.count)


def _check_vocabulary(model: LanguageModel, vocab: int | None, tokenizer_vocab: int) -> None:
    """A tokenizer with more tokens than the model's logits cannot be its own (fewer: a padded vocabulary)."""
    if vocab is not None and tokenizer_vocab > vocab:
        raise UsageError(f"the tokenizer does not match {model.path}: the tokenizer has {tokenizer_vocab} tokens, "
                         f"the model's vocabulary {vocab}")


def compare_perplexity(reference: LanguageModel, candidate: LanguageModel, ids: np.ndarray, tokenizer_vocab: int,
                       window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> dict:
    """Both models' perplexity on ``ids`` (from a tokenizer of ``tokenizer_vocab`` tokens) and the candidate's
    logits against the reference's."""
    for model in (reference, candidate):
        _check_vocabulary(model, model.vocab, tokenizer_vocab)
    spans = list(windows(len(ids), window, stride))
    scores, logits_error = (_Score(), _Score()), OutputAccumulator()
    with progress.task("perplexity", len(spans)) as advance:
        for start, stop, scored in spans:
            chunk = ids[start:stop]
            outputs = [model(chunk) for model in (reference, candidate)]
            for model, logits in zip((reference, candidate), outputs):  # a vocabulary the graph does not state
                _check_vocabulary(model, logits.shape[-1], tokenizer_vocab)
            targets = chunk[len(chunk) - scored:]
            for score, logits in zip(scores, outputs):
                score.add(logits[len(chunk) - scored - 1:-1], targets)
            logits_error.add(outputs[0], outputs[1])
            advance(1)
    reference_ppl, candidate_ppl = (s.perplexity for s in scores)
    return {"tokens": int(len(ids)), "predicted": scores[0].count, "window": window, "stride": stride,
            "reference": reference_ppl, "candidate": candidate_ppl, "ratio": candidate_ppl / reference_ppl,
            "logits": asdict(logits_error.result(reference.logits))}
