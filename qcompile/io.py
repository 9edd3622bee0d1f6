"""Loading and saving models at the edge of the pipeline.

Loading validates what the user handed us and turns every problem into a one-line `UsageError`.
Saving is atomic: model and external data are written into a temporary folder next to the output
and renamed into place, so an interrupted run never leaves a half-written file, and the input file
is never opened for writing.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx.external_data_helper
import onnx_ir as ir

from qcompile.errors import UsageError

# The newest IR version the oldest supported ONNX Runtime (1.20) loads; onnx 1.23 writes IR 11+ by default.
MAX_IR_VERSION = 10
MAX_OPSET_FOR_IR_10 = 21
# Above this many bytes of tensors a model is saved with external data (protobuf's hard limit is 2 GiB,
# and a large inline protobuf costs several copies of itself in memory to write).
EXTERNAL_DATA_THRESHOLD = 256 << 20


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; external data stays on disk until a pass reads it (`ReadOnDemandTensor`)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, RuntimeError, ValueError) as exc:
        raise UsageError(f"{path}: not an ONNX model or truncated ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not proto.ir_version or not proto.HasField("graph"):
        raise UsageError(f"{path}: not an ONNX model (no IR version or graph)")
    _check_external_data(proto, path.parent, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir rejects malformed graphs with assorted exception types
        raise UsageError(f"{path}: malformed ONNX graph ({exc})") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    _read_on_demand(model)
    return model


def _check_external_data(proto: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        data_path = base_dir / info.location
        if not data_path.is_file():
            raise UsageError(f"{path}: external data file {info.location!r} of tensor {tensor.name!r} is missing")
        end = (info.offset or 0) + (info.length or 0)
        if end > data_path.stat().st_size:
            raise UsageError(
                f"{path}: external data file {info.location!r} is too short for tensor {tensor.name!r} "
                f"(needs {end} bytes, has {data_path.stat().st_size})"
            )


class ReadOnDemandTensor(ir.ExternalTensor):
    """An external tensor read into memory of the caller's each time it is read, and never left mapped.

    onnx_ir maps an external tensor's file when it is first read and keeps it mapped, so a pass that
    read every weight of a 4 GB model left 4 GB resident and counted in the process's memory until the
    end of the compile. Reads here cost a copy from the page cache instead.
    """

    @classmethod
    def like(cls, tensor: ir.ExternalTensor) -> ReadOnDemandTensor:
        return cls(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape, name=tensor.name,
                   doc_string=tensor.doc_string, metadata_props=tensor.metadata_props, base_dir=tensor.base_dir)

    def numpy(self) -> np.ndarray:
        try:
            return super().numpy().copy()
        finally:
            self.release()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.numpy().__array__(dtype)

    def tobytes(self) -> bytes:
        try:
            return super().tobytes()
        finally:
            self.release()


def _read_on_demand(model: ir.Model) -> None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ReadOnDemandTensor.like(value.const_value)


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; with external data in ``<name>.data`` beside it.

    ``external_data=None`` chooses: external when the tensors exceed 256 MiB or came from external data.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{path}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{path}: output folder {parent} is not writable")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not a file name")
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD or any(
            isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    model.ir_version = runtime_ir_version(model)
    data_name = external_data_path(path).name
    tmp_dir = Path(tempfile.mkdtemp(prefix=".qcompile-", dir=parent))
    try:
        tmp_model = tmp_dir / path.name
        ir.save(model, str(tmp_model), external_data=data_name if external_data else None)
        if external_data:
            os.replace(tmp_dir / data_name, parent / data_name)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def runtime_ir_version(model: ir.Model) -> int:
    """The IR version to write ``model`` with: its own, capped where that lets the oldest supported ONNX
    Runtime load it (models we save, and those we run from memory)."""
    if model.opset_imports.get("", 0) <= MAX_OPSET_FOR_IR_10:
        return min(model.ir_version, MAX_IR_VERSION)
    return model.ir_version


def external_data_path(path: Path) -> Path:
    """Where `save_model` puts a model's external data: ``<name>.data`` beside it."""
    return path.with_name(f"{path.name}.data")


def model_files(path: str | os.PathLike) -> list[Path]:
    """A model file and the external data files it references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in onnx.external_data_helper._get_all_tensors(proto)
                 for entry in tensor.external_data if entry.key == "location"}
    return [path, *(path.parent / location for location in sorted(locations))]


def check_not_input(output: Path, input: Path, with_data: bool = False) -> None:
    """Refuse to write ``output`` (and, ``with_data``, its external data file) where it would replace the
    input model or the input's external data."""
    protected = {file.resolve(): file for file in model_files(input)}
    for path in (output, external_data_path(output)) if with_data else (output,):
        hit = protected.get(path.resolve())
        if hit is not None:
            what = "the input model" if hit == input else "the input model's external data"
            where = f"{output}:" if path == output else f"{output}: its external data file {path.name}"
            raise UsageError(f"{where} is {what}; qcompile never overwrites its input")
