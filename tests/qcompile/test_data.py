import numpy as np
import pytest

from qcompile.data import InputInfo, count_samples, iterate_batches, model_inputs
from qcompile.errors import UsageError
from qcompile.io import load_model

TOKENS = [InputInfo("ids", np.dtype(np.int64), ("batch", "seq"))]


def _fed(data, inputs, limit=None):
    return np.concatenate([b["ids"] for b in iterate_batches(data, inputs, limit)])


def test_every_sample_is_fed_once_in_order_with_or_without_a_sample_batch_axis(tmp_path):
    ids = np.arange(20 * 5).reshape(20, 5)
    np.savez(tmp_path / "flat.npz", ids=ids)
    np.savez(tmp_path / "nested.npz", ids=ids.reshape(20, 1, 5))
    for name in ("flat.npz", "nested.npz"):
        path = str(tmp_path / name)
        assert count_samples(path, TOKENS) == 20
        np.testing.assert_array_equal(_fed(path, TOKENS), ids)
    assert count_samples(str(tmp_path / "flat.npz"), TOKENS, limit=7) == 7
    np.testing.assert_array_equal(_fed(str(tmp_path / "flat.npz"), TOKENS, limit=7), ids[:7])


def test_a_folder_streams_its_files_in_sorted_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(folder / "b.npz", ids=np.full((3, 5), 2))
    np.savez(folder / "a.npz", ids=np.full((2, 5), 1))
    assert count_samples(str(folder), TOKENS) == 5
    assert _fed(str(folder), TOKENS)[:, 0].tolist() == [1, 1, 2, 2, 2]


def test_dtype_and_count_mismatches_name_the_input(tmp_path):
    np.savez(tmp_path / "f.npz", ids=np.zeros((4, 5), np.int32))
    with pytest.raises(UsageError, match="input 'ids' has dtype int32, the model expects int64"):
        list(iterate_batches(str(tmp_path / "f.npz"), TOKENS))
    two = TOKENS + [InputInfo("mask", np.dtype(np.int64), ("batch", "seq"))]
    np.savez(tmp_path / "g.npz", ids=np.zeros((4, 5), np.int64), mask=np.zeros((3, 5), np.int64))
    with pytest.raises(UsageError, match="different sample counts"):
        list(iterate_batches(str(tmp_path / "g.npz"), two))
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UsageError, match="not a readable .npz"):
        list(iterate_batches(str(tmp_path / "bad.npz"), TOKENS))


def test_random_data_follows_declared_shapes():
    inputs = [InputInfo("x", np.dtype(np.float32), (1, 3, 8, 8)), InputInfo("mask", np.dtype(np.int64), (1, 4))]
    batches = list(iterate_batches("random", inputs, limit=3))
    assert len(batches) == 3
    assert batches[0]["x"].shape == (1, 3, 8, 8) and np.all(batches[0]["mask"] == 1)


def test_a_fixed_batch_axis_takes_that_many_samples_per_feed(tmp_path):
    inputs = [InputInfo("x", np.dtype(np.float32), (4, 6))]
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    np.savez(tmp_path / "x.npz", x=x)
    batches = [b["x"] for b in iterate_batches(str(tmp_path / "x.npz"), inputs)]
    assert [b.shape for b in batches] == [(4, 6), (4, 6)]
    np.testing.assert_array_equal(np.concatenate(batches), x)
    assert [b["x"].shape for b in iterate_batches("random", inputs, limit=2)] == [(4, 6), (4, 6)]
    np.savez(tmp_path / "odd.npz", x=x[:6])
    with pytest.raises(UsageError, match="6 samples along the model's fixed batch axis of 4: give a multiple of 4"):
        list(iterate_batches(str(tmp_path / "odd.npz"), inputs))


def test_scalar_inputs_are_fed_as_0d_arrays(tmp_path):
    inputs = [InputInfo("flag", np.dtype(np.bool_), ())]
    np.savez(tmp_path / "f.npz", flag=np.array([True, False]))
    fed = [b["flag"] for b in iterate_batches(str(tmp_path / "f.npz"), inputs)]
    assert all(isinstance(f, np.ndarray) and f.shape == () for f in fed) and [bool(f) for f in fed] == [True, False]


def test_empty_data_and_a_wrong_rank_are_usage_errors(tmp_path):
    np.savez(tmp_path / "empty.npz", ids=np.zeros((0, 5), np.int64))
    with pytest.raises(UsageError, match="holds no samples"):
        list(iterate_batches(str(tmp_path / "empty.npz"), TOKENS))
    images = [InputInfo("x", np.dtype(np.float32), ("N", 3, 8, 8))]
    np.savez(tmp_path / "flat.npz", x=np.zeros((16, 2, 16), np.float32))
    with pytest.raises(UsageError, match=r"shape \(16, 2, 16\), the model expects \(N, 3, 8, 8\) for its input"):
        list(iterate_batches(str(tmp_path / "flat.npz"), images))


def test_inputs_whose_sample_axes_cannot_share_a_batch_are_a_usage_error(tmp_path):
    inputs = [InputInfo("x", np.dtype(np.float32), (4, 6)), InputInfo("y", np.dtype(np.float32), (4, 6))]
    np.savez(tmp_path / "mixed.npz", x=np.zeros((8, 6), np.float32), y=np.zeros((8, 4, 6), np.float32))
    with pytest.raises(UsageError, match="do not fit one batch"):
        list(iterate_batches(str(tmp_path / "mixed.npz"), inputs))
    np.savez(tmp_path / "nested.npz", x=np.zeros((2, 4, 6), np.float32), y=np.zeros((2, 4, 6), np.float32))
    assert [b["x"].shape for b in iterate_batches(str(tmp_path / "nested.npz"), inputs)] == [(4, 6), (4, 6)]


def test_a_batch_axis_written_as_minus_one_is_free(tmp_path):
    """Paddle exports write free dimensions as -1: data must be fed in batches, not refused or dropped
    (zero batches left SmoothQuant without statistics: an internal error)."""
    import onnx
    from onnx import TensorProto, helper

    import qcompile

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 6, 4])],
                              [onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4))
                                                            .astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "paddle_dims.onnx"
    path.write_bytes(model.SerializeToString())
    (info,) = model_inputs(load_model(path))
    assert info.dims == (None, 6, 8) and info.batched
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((10, 6, 8)).astype(np.float32))
    batches = list(iterate_batches(str(tmp_path / "calib.npz"), [info]))
    assert [b["x"].shape[0] for b in batches] == [8, 2]
    result = qcompile.compile(path, recipe="w8a8", calib=str(tmp_path / "calib.npz"))
    assert result.report["layers"][0]["precision"] == "w:int8 a:uint8"
