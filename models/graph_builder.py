"""A small builder for writing ONNX graphs in Python on top of onnx_ir's tape.

Used by the model builders (real and synthetic) so that each reads like the network it builds:
``h = b.op("MatMul", x, w)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

DEFAULT_OPSET = 18  # what torch's dynamo exporter writes
IR_VERSION = 10  # the newest IR version ONNX Runtime 1.20 (our oldest supported) loads


class GraphBuilder:
    def __init__(self, name: str, opset: int = DEFAULT_OPSET):
        self.name = name
        self.opset = opset
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self._names:
            candidate, i = f"{name}_{i}", i + 1
        self._names.add(candidate)
        return candidate

    def input(self, name: str, dtype: ir.DataType, shape: list[int | str | None]) -> ir.Value:
        value = ir.Value(name=self._unique(name), type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.inputs.append(value)
        return value

    def const(self, name: str, array: np.ndarray | ir.TensorProtocol | float | int) -> ir.Value:
        """An initializer holding ``array`` (a numpy array keeps its dtype; Python scalars become float32/int64;
        an ir tensor, lazy ones included, is used as it is)."""
        if isinstance(array, ir.TensorProtocol):
            name = self._unique(name)
            array.name = name
            return self.tape.initializer(array, name=name)
        if isinstance(array, np.generic):
            array = np.asarray(array)
        elif not isinstance(array, np.ndarray):
            array = np.asarray(array, dtype=np.float32 if isinstance(array, float) else np.int64)
        name = self._unique(name)
        return self.tape.initializer(ir.tensor(array, name=name), name=name)

    def op(self, op_type: str, *inputs: ir.Value | None, name: str | None = None, **attributes: Any) -> ir.Value:
        node_name = self._unique(name or op_type)
        out = self.tape.op(op_type, list(inputs), attributes or None, name=node_name)
        out.name = self._unique(f"{node_name}_out")
        return out

    def op_multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int, name: str | None = None,
                 **attributes: Any) -> list[ir.Value]:
        node_name = self._unique(name or op_type)
        outs = self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=num_outputs,
                                      name=node_name)
        for i, out in enumerate(outs):
            out.name = self._unique(f"{node_name}_out{i}")
        return list(outs)

    def model(self, outputs: dict[str, ir.Value]) -> ir.Model:
        for name, value in outputs.items():
            value.name = name
        graph = ir.Graph(
            self.inputs,
            list(outputs.values()),
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": self.opset},
            name=self.name,
        )
        model = ir.Model(graph, ir_version=IR_VERSION, producer_name="qcompile.models")
        # The tape records no types; ONNX shape inference fills them in (initializers are set aside,
        # so this works for models of any size).
        ir.passes.common.ShapeInferencePass()(model)
        untyped = [v.name for v in graph.outputs if v.type is None]
        if untyped:  # onnx_ir logs inference failures and carries on; a builder must not
            raise ValueError(f"{self.name}: shape inference failed, outputs {untyped} have no type")
        return model
