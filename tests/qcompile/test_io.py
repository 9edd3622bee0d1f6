import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompile.errors import UsageError
from qcompile.io import ReadOnDemandTensor, load_model, save_model
from qcompile.models import synthetic


def _saved(tmp_path, external=False):
    path = tmp_path / "mlp.onnx"
    save_model(synthetic.mlp(), path, external_data=external)
    return path


@pytest.mark.parametrize("content, message", [
    (b"", "not an ONNX model"),
    (b"hello, I am text\n" * 10, "not an ONNX model"),
])
def test_garbage_files_are_refused_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_model(path)


def test_truncated_protobuf_is_refused(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not an ONNX model or truncated"):
        load_model(path)


def test_missing_or_short_external_data_is_named(tmp_path):
    path = _saved(tmp_path, external=True)
    data_file = tmp_path / "mlp.onnx.data"
    data_file.write_bytes(data_file.read_bytes()[:10])
    with pytest.raises(UsageError, match="too short for tensor"):
        load_model(path)
    data_file.unlink()
    with pytest.raises(UsageError, match="external data file 'mlp.onnx.data' of tensor .* is missing"):
        load_model(path)


def test_not_a_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(UsageError, match="not a file"):
        load_model(tmp_path)


def test_external_data_round_trip_is_exact_and_loads_lazily(tmp_path):
    path = _saved(tmp_path, external=True)
    assert (tmp_path / "mlp.onnx.data").is_file()
    proto = onnx.load(str(path), load_external_data=False)
    large = [t for t in proto.graph.initializer if np.prod(t.dims) * 4 > 256]  # smaller ones stay inline
    assert large and all(onnx.external_data_helper.uses_external_data(t) for t in large)
    model = load_model(path)
    resaved = save_model(model, tmp_path / "copy.onnx", external_data=True)
    original = {k: v.const_value.numpy() for k, v in synthetic.mlp().graph.initializers.items()}
    for name, value in load_model(resaved).graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), original[name])


def test_external_weights_are_read_into_fresh_arrays_and_left_unmapped(tmp_path):
    value = load_model(_saved(tmp_path, external=True)).graph.initializers["fc0.weight"]
    assert isinstance(value.const_value, ReadOnDemandTensor)
    first = value.const_value.numpy()
    first[0, 0] = 123.0  # the caller's own copy
    assert value.const_value.raw is None and value.const_value.numpy()[0, 0] != 123.0


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", fail)
    with pytest.raises(UsageError, match="No space left"):
        save_model(synthetic.cnn(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


def test_unwritable_output_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        save_model(synthetic.mlp(), tmp_path / "no" / "such" / "out.onnx")


def test_saved_ir_version_loads_on_the_oldest_supported_runtime(tmp_path):
    model = synthetic.mlp()
    model.ir_version = 11
    path = tmp_path / "m.onnx"
    save_model(model, path)
    assert onnx.load(str(path)).ir_version == 10
