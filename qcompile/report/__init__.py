"""The compile report, typed: what `--report` writes as JSON (`Report.to_json`), what the console shows
(`qcompile.report.console`), and what an HTML renderer will read."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class SizeBytes:
    before: int
    after: int | None = None


@dataclass
class Layer:
    name: str
    op_type: str
    precision: str  # "w:int8 a:uint8", "a:uint8 x a:uint8" (two activations), "w:fp32 a:fp32"
    why: str | None = None  # why a layer with a stored weight computes in float, where a pass said


@dataclass
class OutputError:
    name: str
    sqnr_db: float
    cosine: float
    max_abs: float
    argmax_agreement: float | None = None  # share of positions with the same argmax along the last axis


@dataclass
class Latency:
    batch: int
    reference: float  # ms, median of interleaved runs on one feed of this batch
    candidate: float
    ratio: float
    runs: int


@dataclass
class Verification:
    samples: int | None
    outputs: list[OutputError]
    runtime: str  # how the candidate was run here (`qcompile.target_check.checked_on`)
    latency_ms: list[Latency] | None = None  # per batch size; None where this machine's speed is not the target's
    latency_note: str | None = None  # why a batch size was not timed
    min_sqnr_db: float | None = None
    passed: bool = True
    layers: list[dict] | None = None  # per quantized tensor, worst first (`qcompile.verify.layer_errors`)
    blame: dict | None = None  # the row of the layer that adds the most error
    # decoder LMs: both models' perplexity on a text (`qcompile.perplexity.compare_perplexity`) and its bound
    perplexity: dict | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("latency_ms", "latency_note", "layers", "blame", "perplexity"):  # absent where not measured
            if data[key] is None:
                del data[key]
        return data


@dataclass
class Report:
    recipe: str
    options: dict
    node_settings: list[dict]
    target: str
    input: str
    size_bytes: SizeBytes
    passes: list[PassRecord]
    layers: list[Layer]
    notes: list[str]
    cpu: dict | None  # the `cpu` option's choice and why (targets whose CPU kernels may run the model)
    versions: dict
    command: str
    output: str | None = None
    verification: Verification | None = None
    # The compile's peak resident memory, input weights read from disk included (`qcompile.memory`).
    peak_memory_bytes: int | None = None

    def to_json(self) -> dict:
        """The JSON object `--report` writes (INTERFACE.md)."""
        data = asdict(self)
        data["verification"] = None if self.verification is None else self.verification.to_json()
        return data
