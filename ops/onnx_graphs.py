"""What the ops' one-node models and standard-ONNX equivalents share: the model around the nodes, and the
activations' INT8 round trip (max |x| / 127 per slice, rounded to even, clipped, back to float).

Every model has input ``A`` (batch, rows, K) and output ``Y`` (batch, rows, N), float32 or float16 (``dtype``), at
IR version 10 (what every supported ONNX Runtime reads, `qcompile.io.MAX_IR_VERSION`).
"""
from __future__ import annotations

import numpy as np

IR_VERSION = 10
# Constants `int8_round_trip` reads (a model using it includes them).
ROUND_TRIP_CONSTANTS = {"top": np.array(127, np.float32), "zero": np.array(0, np.float32),
                        "bottom": np.array(-127, np.float32)}


def model(name: str, nodes: list, constants: dict[str, np.ndarray], *, K: int, N: int, opset: int,
          domain: str | None = None, dtype=np.float32):
    """A ModelProto of ``nodes`` on ``A`` -> ``Y``, ``constants`` as initializers, importing ``domain`` if given."""
    from onnx import helper, numpy_helper

    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("A", elem_type, ["batch", "rows", K])],
        [helper.make_tensor_value_info("Y", elem_type, ["batch", "rows", N])],
        [numpy_helper.from_array(value, key) for key, value in constants.items()])
    opsets = [helper.make_opsetid("", opset), *([helper.make_opsetid(domain, 1)] if domain else [])]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def one_node_model(op_type: str, domain: str, weights: dict[str, np.ndarray | None], attributes: dict, *, K: int,
                   N: int, opset: int, dtype=np.float32):
    """``Y = op_type(A, *weights)``, the weights as initializers; one that is None is an optional input left out."""
    from onnx import helper

    names = [name if value is not None else "" for name, value in weights.items()]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op_type, ["A", *names], ["Y"], domain=domain, **attributes)
    given = {name: value for name, value in weights.items() if value is not None}
    return model(op_type, [node], given, K=K, N=N, opset=opset, domain=domain, dtype=dtype)


def int8_round_trip(x: str, axes: str, output: str) -> list:
    """Nodes taking ``x`` to ``output``: each slice along the axes ``axes`` (an int64 initializer) quantized to
    INT8 by its max |x| and taken back to float (a slice of zeros stays zeros)."""
    from onnx import helper

    return [helper.make_node("Abs", [x], [f"{x}_magnitudes"]),
            helper.make_node("ReduceMax", [f"{x}_magnitudes", axes], [f"{x}_amax"], keepdims=1),
            helper.make_node("Div", ["top", f"{x}_amax"], [f"{x}_inverse_or_inf"]),
            helper.make_node("Greater", [f"{x}_amax", "zero"], [f"{x}_nonzero"]),
            helper.make_node("Where", [f"{x}_nonzero", f"{x}_inverse_or_inf", "zero"], [f"{x}_inverse"]),
            helper.make_node("Mul", [x, f"{x}_inverse"], [f"{x}_scaled"]),
            helper.make_node("Round", [f"{x}_scaled"], [f"{x}_rounded"]),
            helper.make_node("Clip", [f"{x}_rounded", "bottom", "top"], [f"{x}_levels"]),
            helper.make_node("Div", [f"{x}_amax", "top"], [f"{x}_step"]),
            helper.make_node("Mul", [f"{x}_levels", f"{x}_step"], [output])]


def leading_shape_with(n: str, y_rows: str) -> list:
    """Nodes reshaping ``y_rows`` (rows, N) to ``Y``: A's leading dimensions and the int64 initializer ``n``."""
    from onnx import helper

    return [helper.make_node("Shape", ["A"], ["a_shape"], end=-1),
            helper.make_node("Concat", ["a_shape", n], ["y_shape"], axis=0),
            helper.make_node("Reshape", [y_rows, "y_shape"], ["Y"])]
