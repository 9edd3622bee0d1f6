"""Decide which op inputs carry quantized activations (the op rules in `qcompile.op_rules`)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile.decisions import (FLOAT_ISLANDS_KEY, FLOAT_REASON_KEY, NEEDS_RANGE_KEY, QUANTIZED_INPUTS_KEY, SHARED_SPEC_KEY,
                                SharedSpec)
from qcompile.graph import graph_values, name_matches
from qcompile.notes import add_note
from qcompile.op_rules import (CLIPS, COMPUTE_OPS, ELEMENTWISE_OPS, QUANTIZED_OUTPUT_OPS, SHARED_OPS, candidate_inputs,
                               qdq_missing_note)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class SelectOptions:
    exclude: tuple[str, ...] = ()
    # Quantize a Conv's output only for readers that are quantized themselves, and leave float, weight
    # and all, each Conv that then has no integer output (`float_islands`).
    float_islands: bool = False


ISLAND_REASON = ("placement: float ops (not quantized ones) read its output, and Q/DQ around them would cost more "
                 "than integers save; left float with its weight (float_islands)")

EXCLUDED_REASON = "excluded (--exclude, or a [[nodes]] table with quantize = false)"


def _is_activation(value: ir.Value | None) -> bool:
    if value is None or value.dtype not in FLOAT_TYPES or value.const_value is not None:
        return False
    producer = value.producer()
    # Already behind a DequantizeLinear (a second run) or a Constant: not an activation to quantize.
    return producer is None or producer.op_type not in ("DequantizeLinear", "Constant")


def data_dependent_values(graph: ir.Graph) -> set[ir.Value]:
    """The values that depend on the graph inputs' contents, not only on their shapes.

    Positions that an export computes from Shape -> Range and feeds to a MatMul (RoPE's angles, say)
    are exact integers whose range grows with the sequence length: calibration cannot cover them, and
    rounding them ruins what reads them, so compute ops never quantize such inputs. (Elementwise joins
    still may: cos/sin tables sliced by length stay within [-1, 1].)
    """
    dependent = set(graph.inputs)
    for node in graph:
        if node.op_type in ("Shape", "Size") and node.domain == "":
            continue
        if any(value in dependent for value in node.inputs):
            dependent.update(node.outputs)
    return dependent


def float_islands(graph: ir.Graph, marks: dict[ir.Node, tuple[int, ...]], wanted: set[ir.Value]) -> list[ir.Node]:
    """The quantized Convs with no integer output: neither their output nor that of the Relu/Clip
    reading it is quantized. ONNX Runtime runs them in float, their weight dequantized on every call."""
    islands = []
    for node in marks:
        if node.op_type not in QUANTIZED_OUTPUT_OPS:
            continue
        output = node.outputs[0]
        users = [user for user, _ in output.uses()]
        clipped = users and all(u.op_type in CLIPS and u.outputs[0] in wanted for u in users)
        if output not in wanted and not clipped:
            islands.append(node)
    return islands


class SelectQuantizedOpsPass(ir.passes.InPlacePass):
    """Mark the activation inputs of compute ops, and of the ops between them, for quantization.

    Walks the graph backwards: a non-compute op (Reshape, residual Add, Relu, ...) is quantized only
    if its output feeds an op that is. Then a quantized Conv's output is quantized for its readers, so
    that ONNX Runtime can run the Conv on integers. The quantized inputs and the output of an op that
    moves values without computing new ones (`SHARED_OPS`) get one `SharedSpec`. With `float_islands`,
    a Conv that would still have no integer output is left float, and the walk repeats without it.
    Main graph only; control-flow subgraphs stay float.
    """

    name = "select-quantized-ops"

    def __init__(self, options: SelectOptions = SelectOptions()):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if (missing := qdq_missing_note(model)) is not None:
            add_note(model, missing)
            return ir.passes.PassResult(model, modified=False)
        dependent = data_dependent_values(model.graph)
        islands = self._float_islands(model.graph, dependent)
        model.meta[FLOAT_ISLANDS_KEY] = len(islands)  # counted either way: placement decides whether to time
        if not self.options.float_islands:
            islands = set()
        marks, wanted = self._select(model.graph, dependent, islands, self.options.float_islands)
        modified = False
        for node in model.graph:
            if node.meta.get(QUANTIZED_INPUTS_KEY) != marks.get(node):
                if node in marks:
                    node.meta[QUANTIZED_INPUTS_KEY] = marks[node]
                else:
                    del node.meta[QUANTIZED_INPUTS_KEY]
                modified = True
            if node in islands:
                node.meta[FLOAT_REASON_KEY] = ISLAND_REASON
            elif node.op_type in COMPUTE_OPS and self._excluded(node):
                node.meta[FLOAT_REASON_KEY] = EXCLUDED_REASON
        for value in wanted:
            value.meta[NEEDS_RANGE_KEY] = True
        for group in _shared_groups(model, wanted):
            for value in group:
                value.meta[SHARED_SPEC_KEY] = SharedSpec(group[0])
        return ir.passes.PassResult(model, modified=modified)

    def _float_islands(self, graph: ir.Graph, dependent: set[ir.Value]) -> set[ir.Node]:
        """The Convs `float_islands` leaves float: those without an integer output, then those that lose
        theirs because a reader was left float, until none does."""
        islands: set[ir.Node] = set()
        while found := float_islands(graph, *self._select(graph, dependent, islands, direct_only=True)):
            islands.update(found)
        return islands

    def _select(self, graph: ir.Graph, dependent: set[ir.Value], skipped: set[ir.Node], direct_only: bool):
        """The quantized input slots of each node, and the set of quantized values. ``direct_only``: a
        Conv output is quantized only for readers that are quantized themselves."""
        marks: dict[ir.Node, tuple[int, ...]] = {}
        wanted: set[ir.Value] = set()
        for node in reversed(list(graph)):
            if node.domain != "" or self._excluded(node) or node in skipped:
                continue
            slots = [i for i in candidate_inputs(node.op_type, len(node.inputs)) if _is_activation(node.inputs[i])
                     and (node.op_type not in COMPUTE_OPS or node.inputs[i] in dependent)]
            if not slots:
                continue
            if node.op_type not in COMPUTE_OPS and not any(_reaches_quantized(out, wanted) for out in node.outputs):
                continue
            if node.op_type in ELEMENTWISE_OPS and len(slots) < 2:
                continue  # Add/Mul with a constant: a bias or scale, not a residual join
            wanted.update(node.inputs[i] for i in slots)
            marks[node] = tuple(slots)
        feeding = wanted if direct_only else _feeding_quantized(graph, wanted)
        for node in graph:
            if node.op_type in QUANTIZED_OUTPUT_OPS and node in marks:
                self._quantize_output(node.outputs[0], wanted, feeding, marks, skipped)
        return marks, wanted

    def _quantize_output(self, value: ir.Value, wanted: set[ir.Value], feeding: set[ir.Value],
                         marks: dict[ir.Node, tuple[int, ...]], skipped: set[ir.Node]) -> None:
        """Quantize ``value`` for all its readers (`qcompile.op_rules`: quantized Conv outputs) where
        each reader's output goes on to a quantized input (through HardSwish, a scale and shift, ...).
        Not where the readers are Relu/Clip (their grid holds the clip and ONNX Runtime fuses them
        into the integer Conv), and not in a head whose result goes on in float (a Conv -> Sigmoid ->
        graph output keeps its output precision)."""
        users = [(user, index) for user, index in value.uses() if not self._excluded(user) and user not in skipped]
        if value.is_graph_output() or not users:
            return
        if not all(any(out in feeding for out in user.outputs) for user, _ in users):
            return
        if all(user.op_type in CLIPS for user, _ in users):
            return
        wanted.add(value)
        for user, index in users:
            marks[user] = tuple(sorted({*marks.get(user, ()), index}))

    def _excluded(self, node: ir.Node) -> bool:
        return name_matches(node.name, self.options.exclude)


def _reaches_quantized(value: ir.Value, wanted: set[ir.Value]) -> bool:
    """Whether ``value`` is quantized, or read only by Relu / Clip whose outputs are: a residual Add before
    a Relu, which ONNX Runtime runs as a QLinearAdd once the Relu's grid holds the clip."""
    if value in wanted:
        return True
    users = [user for user, _ in value.uses()]
    return bool(users) and not value.is_graph_output() and all(
        user.op_type in CLIPS and user.outputs[0] in wanted for user in users)


def _feeding_quantized(graph: ir.Graph, wanted: set[ir.Value]) -> set[ir.Value]:
    """The values from which float ops other than compute ops lead to a quantized input."""
    feeding = set(wanted)
    for node in reversed(list(graph)):
        if node.domain == "" and node.op_type not in COMPUTE_OPS and any(out in feeding for out in node.outputs):
            feeding.update(value for value in node.inputs if _is_activation(value))
    return feeding


def _shared_groups(model: ir.Model, values: set[ir.Value]) -> list[list[ir.Value]]:
    """Values that must share one spec (two or more): the quantized inputs and the output of each shared op."""
    parent = {v: v for v in values}

    def find(v):
        while parent[v] is not v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for node in model.graph:
        if node.op_type not in SHARED_OPS or QUANTIZED_INPUTS_KEY not in node.meta:
            continue
        members = [node.inputs[i] for i in node.meta[QUANTIZED_INPUTS_KEY]] + [node.outputs[0]]
        members = [m for m in members if m in parent]
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    groups: dict[ir.Value, list[ir.Value]] = {}
    for value in (v for v in graph_values(model.graph) if v in parent):
        groups.setdefault(find(value), []).append(value)
    return [group for group in groups.values() if len(group) > 1]
