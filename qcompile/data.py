"""Calibration / evaluation data (INTERFACE.md `DATA`): a .npz, a folder of .npz files, or `random`.

Every array has a leading sample axis. Samples are streamed file by file and fed in batches where
the model's batch axis is dynamic, one at a time otherwise. Anything that does not match the model's
declared inputs is a `UsageError` naming the input and both shapes.
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.errors import UsageError

RANDOM = "random"
MAX_BATCH = 8


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]  # str/None: symbolic or unknown

    @property
    def batched(self) -> bool:
        """True when the first axis is a free (symbolic) batch axis."""
        return bool(self.dims) and not isinstance(self.dims[0], int)

    def describe(self) -> str:
        return "(" + ", ".join(_dim(d) for d in self.dims) + ")"


def model_inputs(model: ir.Model) -> list[InputInfo]:
    infos = []
    for value in model.graph.inputs:
        if value in model.graph.initializers.values():
            continue  # an initializer listed as input: has a default, not user data
        # Paddle exports write free dimensions as -1: free, like a named or unnamed one.
        dims = tuple((d if d >= 0 else None) if isinstance(d, int) else (d.value if d is not None else None)
                     for d in (value.shape or []))
        infos.append(InputInfo(value.name, np.dtype(value.dtype.numpy()), dims))
    return infos


def iterate_batches(data: str, inputs: list[InputInfo], limit: int | None = None,
                    seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yield feeds for ONNX Runtime, at most ``limit`` samples in all."""
    remaining = limit if limit is not None else float("inf")
    for arrays, source in _sources(data, inputs, seed, limit):
        count = _check_arrays(arrays, inputs, source)
        batch = _batch_size(arrays, inputs)
        for start in range(0, count, batch):
            take = int(min(batch, count - start, remaining))
            if take <= 0:
                return
            yield {i.name: _sample(arrays[i.name], i, start, take) for i in inputs}
            remaining -= take


def count_samples(data: str, inputs: list[InputInfo], limit: int | None = None) -> int | None:
    """How many samples `iterate_batches` will give, or None if unknown without reading everything."""
    if data == RANDOM:
        return limit or MAX_BATCH
    path = Path(data)
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    total = sum(_npz_samples(file, inputs[0].name) for file in files) if inputs else 0
    return min(total, limit) if limit else total


def _npz_samples(file: Path, key: str) -> int:
    """The leading dimension of one array of a .npz, read from its header without loading the data."""
    try:
        with zipfile.ZipFile(file) as archive, archive.open(f"{key}.npy") as member:
            major, _ = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = read_header(member)[0]
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return 0  # reported properly when the file is read
    return shape[0] if shape else 0


def _batch_size(arrays: dict[str, np.ndarray], inputs: list[InputInfo]) -> int:
    """Samples per feed: batches where every input's batch axis is free and the arrays' sample axis maps onto
    it; a fixed batch axis of B takes B samples at a time (`_check_arrays` saw that the counts divide)."""
    on_batch_axis = [i for i in inputs if arrays[i.name].ndim == len(i.dims)]
    fixed = {i.dims[0] for i in on_batch_axis if not i.batched}
    if len(fixed) > 1 or (fixed - {1} and len(on_batch_axis) < len(inputs)):
        raise UsageError(f"inputs {', '.join(i.name for i in inputs)}: their sample axes do not fit one batch; give "
                         f"each input's arrays an extra leading sample axis (N, *its shape)")
    if fixed:
        return fixed.pop()
    return MAX_BATCH if len(on_batch_axis) == len(inputs) else 1


def _sample(array: np.ndarray, info: InputInfo, start: int, take: int) -> np.ndarray:
    if len(info.dims) == array.ndim:  # the model has a batch axis: slices keep it
        return array[start:start + take]
    return np.asarray(array[start])  # a 0-d array, not a numpy scalar, for scalar inputs


def _sources(data: str, inputs: list[InputInfo], seed: int, limit: int | None):
    if data == RANDOM:
        yield _random_arrays(inputs, limit or MAX_BATCH, seed), "random data"
        return
    path = Path(data)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UsageError(f"{path}: folder holds no .npz files")
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"{path}: no such data file or folder (expected .npz, a folder of them, or 'random')")
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise UsageError(f"{file}: not a readable .npz file ({exc})") from None
        yield arrays, str(file)


def _check_arrays(arrays: dict[str, np.ndarray], inputs: list[InputInfo], source: str) -> int:
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise UsageError(f"{source}: no array for model input {missing[0]!r} (has: {', '.join(sorted(arrays))})")
    counts = set()
    for info in inputs:
        array = arrays[info.name]
        if array.dtype != info.dtype:
            raise UsageError(f"{source}: input {info.name!r} has dtype {array.dtype}, the model expects {info.dtype}")
        sample_dims = info.dims[1:] if len(info.dims) == array.ndim else info.dims
        if array.ndim != len(sample_dims) + 1 or any(
            isinstance(want, int) and want != got for want, got in zip(sample_dims, array.shape[1:])
        ):
            raise UsageError(f"{source}: input {info.name!r} has shape {array.shape}, the model expects "
                             f"{_expected_shape(info)} for its input {info.describe()}")
        if array.ndim == len(info.dims) and not info.batched and array.shape[0] % info.dims[0]:
            raise UsageError(f"{source}: input {info.name!r} has {array.shape[0]} samples along the model's fixed "
                             f"batch axis of {info.dims[0]}: give a multiple of {info.dims[0]}, or arrays of shape "
                             f"(N, {', '.join(_dim(d) for d in info.dims)})")
        counts.add(array.shape[0])
    if len(counts) != 1:
        raise UsageError(f"{source}: arrays have different sample counts {sorted(counts)}")
    count = counts.pop()
    if count == 0:
        raise UsageError(f"{source}: holds no samples (its arrays' leading axis is 0)")
    return count


def _dim(d: int | str | None) -> str:
    return "?" if d is None else str(d)


def _expected_shape(info: InputInfo) -> str:
    """The data shapes that fit an input: the sample axis either is its batch axis or comes before it."""
    if not info.dims:
        return "(N,)"
    on_batch_axis = f"(N{''.join(', ' + _dim(d) for d in info.dims[1:])})"
    if info.batched or info.dims[0] == 1:
        return on_batch_axis
    return f"(N, {', '.join(_dim(d) for d in info.dims)}) or {on_batch_axis}"


def _random_arrays(inputs: list[InputInfo], count: int, seed: int) -> dict[str, np.ndarray]:
    """Smoke-test inputs: integers are 0 or 1 (valid ids and type ids; masks all ones), floats normal."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for info in inputs:
        # The leading (batch) axis carries the samples, or comes before a fixed batch axis other than 1;
        # other symbolic dims become 16.
        dims = info.dims if info.dims and not info.batched and info.dims[0] != 1 else info.dims[1:]
        shape = (count, *(d if isinstance(d, int) else 16 for d in dims))
        if np.issubdtype(info.dtype, np.integer):
            arrays[info.name] = (np.ones(shape) if "mask" in info.name else rng.integers(0, 2, shape)).astype(info.dtype)
        elif info.dtype == np.bool_:
            arrays[info.name] = np.ones(shape, dtype=bool)
        else:
            arrays[info.name] = rng.standard_normal(shape).astype(info.dtype)
    return arrays
