"""Which float weights of layers that compute in float to store as INT8 (`store-int8-weights`), by the
error each causes at the model's outputs.

Rounding a weight to INT8 with one scale per channel costs it ~40 dB, but what that does to the outputs
differs by model and layer: in PP-OCRv2's recognizer one 144-value depthwise kernel (48 dB on its own)
took the output to 15 dB, while most other weights cost it nothing measurable. So each candidate is
rounded alone and the model run on the first calibration sample, all of them in one session that reads
the weights as inputs. This runs before activations get Q/DQ: after, a weight's small change flips
roundings downstream, which, measured as its error, kept 32 of 33 weights of PP-OCRv5's detector float.
Where the outputs bear every candidate rounded at once (`OUTPUT_SQNR_DB` below every output), all are
stored, measured in one run; else weights are chosen in order of least output error per byte saved,
while the sum of their errors stays that far below every output; the others are stored as float16
(`store-float16-weights`) where the outputs bear that too: all of them where they bear that together
(one run), else the longest run of them, those INT8 rounding cost least first, that the outputs bear
together (found by bisection) and each other one they still bear on top; the rest float32. Without
calibration data, and inside control-flow subgraphs, every candidate is stored. A weight that INT8 holds
worse than `MIN_WEIGHT_SQNR_DB` itself, and the weights of layers the user excluded, stay float32.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.calibration import CalibrationData
from qcompile.data import model_inputs
from qcompile.decisions import FLOAT16_STORAGE_KEY, INT8_STORAGE_KEY
from qcompile.graph import all_graphs, name_matches
from qcompile.io import save_model
from qcompile.layers import RECURRENT_OPS
from qcompile.notes import add_note, some_names
from qcompile.op_rules import weight_axis
from qcompile.session import run, session
from qcompile.verify import latency_feeds, worst_sqnr_db
from qcompile.weight_storage import float16_copy, int8_decoded

MIN_ELEMENTS = 16  # smaller constants gain nothing
MIN_PER_SCALE = 8  # fewer values per scale (a [V, 2] table's rows) save too little against the scales' bytes
MIN_OPSET = 7  # Mul broadcasts from opset 7
MIN_WEIGHT_SQNR_DB = 30.0
# A 20 dB model would lose 0.1 dB to the errors' sum if they added up as measured; they do not quite: one
# sample with float activations understates them. At 30 dB, PP-OCRv5's recognizer with float islands went
# from 20.4 to 17.7 dB on its calibration samples.
OUTPUT_SQNR_DB = 36.0


@dataclass(frozen=True)
class ChooseInt8StorageOptions:
    data: CalibrationData | None = None  # None: every candidate is stored, unmeasured
    exclude: tuple[str, ...] = ()  # --exclude patterns: their layers keep float32 weights
    tables: bool = True  # embedding Gathers' tables too (the recipes' `embeddings` option)


def _channel_axes(node: ir.Node, index: int, tables: bool) -> tuple[int, ...] | None:
    """The axes along which ``node``'s input ``index`` gets its own scales, if it is a weight."""
    if node.domain != "":
        return None
    if index == 1 and (axis := weight_axis(node)) is not None:
        return (axis,)
    if node.op_type in RECURRENT_OPS and index in (1, 2):  # W, R: [directions, gates x hidden, inputs]
        return (0, 1)
    if tables and node.op_type == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0:
        return (0,)  # an embedding table: one scale per row
    return None


def _weight_axes(value: ir.Value, options: ChooseInt8StorageOptions) -> tuple[int, ...] | None:
    """The channel axes every reader of ``value`` agrees on, or None if one reads it as other than a weight
    or is excluded."""
    axes = _readers_axes(value, options)
    return axes.pop() if len(axes) == 1 else None


def _hands_on(node: ir.Node, index: int) -> bool:
    """Whether ``node`` hands its input ``index`` on with the same axes: Identity, a Slice or Split of it,
    a Cast to float32 (a float16 model's, after `upcast-float16`)."""
    if index != 0 or node.domain != "":
        return False
    return node.op_type in ("Identity", "Slice", "Split") or (
        node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT)


def _readers_axes(value: ir.Value, options: ChooseInt8StorageOptions) -> set[tuple[int, ...] | None]:
    """The channel axes each reader of ``value`` asks for (None: not a weight), looking through ops that
    keep its axes (`_hands_on`) and into the carried inputs of Loops whose body hands them on unchanged
    (tf2onnx's Keras LSTM carries its weights so, and slices each gate's columns off them)."""
    axes: set[tuple[int, ...] | None] = set()
    for user, index in value.uses():
        if name_matches(user.name, options.exclude):
            return {None}
        if _hands_on(user, index):
            for output in user.outputs:
                axes |= {None} if output.is_graph_output() else _readers_axes(output, options)
        elif user.op_type == "Loop" and user.domain == "" and index >= 2:
            body = user.attributes["body"].value
            carried = body.inputs[index]  # Loop inputs (M, cond, carried...) match body inputs (i, cond, carried...)
            axes |= _readers_axes(carried, options) if body.outputs[index - 1] is carried else {None}
        else:
            axes.add(_channel_axes(user, index, options.tables))
    return axes


@dataclass
class _Candidate:
    value: ir.Value
    array: np.ndarray
    axes: tuple[int, ...]
    in_main_graph: bool
    relative_error: float = 0.0  # output noise over signal (the worst output) with this weight alone rounded

    @property
    def bytes_saved(self) -> int:
        """float32 -> INT8, less the float32 scales."""
        return 3 * self.array.size - 4 * int(np.prod([self.array.shape[axis] for axis in self.axes]))


class ChooseInt8StoragePass(ir.passes.InPlacePass):
    """Mark (`INT8_STORAGE_KEY`) the float weights of float layers whose INT8 rounding the outputs can bear."""

    name = "choose-int8-storage"
    reads_calibration_data = True

    def __init__(self, options: ChooseInt8StorageOptions = ChooseInt8StorageOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        candidates, held_badly = self._candidates(model)
        if held_badly:
            add_note(model, f"{len(held_badly)} float weight(s) kept float32: INT8 would hold them under "
                     f"{MIN_WEIGHT_SQNR_DB:g} dB: {some_names(held_badly)}")
        measured = [c for c in candidates if c.in_main_graph]
        chosen = [c for c in candidates if not c.in_main_graph]
        if measured and self.options.data is not None:
            with tempfile.TemporaryDirectory(prefix="qcompile-storage-") as folder:
                chosen += self._within_budget(model, _Probe(model, measured, self.options.data, Path(folder)))
        else:
            chosen += measured
        for candidate in chosen:
            candidate.value.meta[INT8_STORAGE_KEY] = candidate.axes
        return ir.passes.PassResult(model, modified=bool(candidates))

    def _within_budget(self, model: ir.Model, probe: _Probe) -> list[_Candidate]:
        """The candidates to store as INT8, in order of least error per byte while their errors sum to under
        the budget; the others marked for float16 where the outputs bear that too, all at once."""
        budget, spent, kept = 10 ** (-OUTPUT_SQNR_DB / 10), 0.0, []
        if probe.relative_error({c.value: int8_decoded(c.array, c.axes) for c in probe.candidates}) <= budget:
            return list(probe.candidates)  # all of them at once: one run instead of one per weight
        for candidate in probe.candidates:
            rounded = int8_decoded(candidate.array, candidate.axes)
            candidate.relative_error = probe.relative_error({candidate.value: rounded})
        for candidate in sorted(probe.candidates, key=lambda c: c.relative_error / c.bytes_saved):
            if spent + candidate.relative_error <= budget:
                spent += candidate.relative_error
                kept.append(candidate)
        left = [c for c in probe.candidates if c not in kept]
        for candidate in left:
            candidate.value.meta[INT8_STORAGE_KEY] = None  # measured: not INT8 (a second run leaves it)
        if not left:
            return kept
        halves = {c.value: half.astype(np.float32) for c in sorted(left, key=lambda c: c.relative_error)
                  if (half := float16_copy(c.array)) is not None}
        as_float16 = _most_borne(probe, halves, budget - spent)
        for value in as_float16:
            value.meta[FLOAT16_STORAGE_KEY] = True
        stored = (f"{len(as_float16)} as float16, {len(left) - len(as_float16)} as float32" if as_float16
                  else "as float32")
        add_note(model, f"{len(left)} of {len(probe.candidates)} float weights of float layers stored {stored}: "
                 f"INT8 would take the outputs under {OUTPUT_SQNR_DB:g} dB (measured on one calibration sample): "
                 f"{some_names([c.value.name for c in left])}")
        return kept

    def _candidates(self, model: ir.Model) -> tuple[list[_Candidate], list[str]]:
        candidates, held_badly = [], []
        if model.opset_imports.get("", 1) < MIN_OPSET:
            return candidates, held_badly
        for graph in all_graphs(model):
            for value in graph.initializers.values():
                if (value.dtype != ir.DataType.FLOAT or value.is_graph_input() or value.is_graph_output()
                        or INT8_STORAGE_KEY in value.meta or not value.uses()):
                    continue
                array = value.const_value.numpy()
                if array.size < MIN_ELEMENTS or (axes := _weight_axes(value, self.options)) is None:
                    continue
                if array.size < MIN_PER_SCALE * np.prod([array.shape[axis] for axis in axes]):
                    continue
                if worst_sqnr_db([array], [int8_decoded(array, axes)]) < MIN_WEIGHT_SQNR_DB:
                    held_badly.append(value.name)
                    continue
                candidates.append(_Candidate(value, array, axes, graph is model.graph))
        return candidates, held_badly


def _most_borne(probe: _Probe, replacements: dict[ir.Value, np.ndarray], budget: float) -> list[ir.Value]:
    """Those of ``replacements`` the outputs bear together within ``budget``: all where they do (one run);
    else the longest run of them in order, found by bisection (as if each one more only added error), and
    then each of the others that the outputs still bear on top, in order (the order is a guess: on
    PP-OCRv5's recognizer the run alone kept 23 of 37)."""
    items = list(replacements.items())

    def borne(chosen: list[tuple[ir.Value, np.ndarray]]) -> bool:
        return not chosen or probe.relative_error(dict(chosen)) <= budget

    if borne(items):
        return list(replacements)
    low, high = 0, len(items)  # borne(items[:low]), not borne(items[:high])
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if borne(items[:middle]) else (low, middle)
    chosen = items[:low]
    for item in items[high:]:
        if borne(chosen + [item]):
            chosen.append(item)
    return [value for value, _ in chosen]


class _Probe:
    """The model (its activations still float) on the first calibration sample, in one session that reads
    the candidates' weights as inputs: the outputs' error when some of them are replaced."""

    def __init__(self, model: ir.Model, candidates: list[_Candidate], data: CalibrationData, folder: Path):
        self.candidates = candidates
        inputs = model_inputs(model)
        feeds, _ = latency_feeds(next(iter(data.batches(inputs))), inputs)
        self.feed = {**feeds[min(feeds)], **{c.value.name: c.array for c in candidates}}
        probe = _weights_as_inputs(model, [c.value.name for c in candidates], folder)
        self.session = session(probe, config=EXACT_MATMULS)
        self.expected = self._run({})

    def _run(self, replaced: dict[ir.Value, np.ndarray]) -> list[np.ndarray]:
        feed = {**self.feed, **{value.name: array for value, array in replaced.items()}}
        return run(self.session, None, feed, "the model on calibration data")

    def relative_error(self, replaced: dict[ir.Value, np.ndarray]) -> float:
        """Noise over signal power of the worst output."""
        return 10 ** (-worst_sqnr_db(self.expected, self._run(replaced)) / 10)


# Dequantized weights' products computed in float: ONNX Runtime would otherwise fuse DequantizeLinear ->
# MatMul into MatMulNBits at accuracy level 4, which quantizes the activations.
EXACT_MATMULS = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _weights_as_inputs(model: ir.Model, names: list[str], folder: Path) -> Path:
    """``model`` saved in ``folder`` with the main graph's initializers ``names`` turned into inputs."""
    path = save_model(model, folder / "probe.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    chosen = set(names)
    kept = [tensor for tensor in proto.graph.initializer if tensor.name not in chosen]
    moved = [tensor for tensor in proto.graph.initializer if tensor.name in chosen]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in moved)
    onnx.save(proto, str(path))
    return path
