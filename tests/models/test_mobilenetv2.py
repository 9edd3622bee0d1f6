"""MobileNetV2 built from torchvision's weights: the checkpoint reader, the graph, and the image data."""
from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import onnx_ir as ir
import pytest
import skimage.data

from qcompile.errors import UsageError
from qcompile.io import load_model
from qcompile.models import mobilenetv2 as mnv2
from qcompile.models.registry import build_cached
from qcompile.runtime import onnxruntime


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return mnv2.load_state_dict(mnv2.PACKAGE.path())


@pytest.fixture(scope="module")
def model() -> ir.Model:
    return load_model(build_cached(mnv2.ENTRY))


def _session(model: ir.Model):
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- the checkpoint reader ---------------------------------------------------------------------------

def test_state_dict_has_torchvision_layout(state_dict):
    assert len(state_dict) == 314  # 52 convs, 52 batch norms of 5 tensors each, the classifier's 2
    params = sum(v.size for k, v in state_dict.items() if "running" not in k and "num_batches" not in k)
    assert params == 3_504_872  # torchvision's documented parameter count
    assert state_dict["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state_dict["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)  # depthwise
    assert state_dict["classifier.1.weight"].shape == (1000, 1280)
    assert state_dict["features.0.1.num_batches_tracked"].dtype == np.int64
    variances = [v for k, v in state_dict.items() if k.endswith("running_var")]
    assert len(variances) == 52 and all((v > 0).all() for v in variances)
    # Trained weights, not zeros or garbage bytes.
    w = state_dict["features.0.0.weight"]
    assert np.isfinite(w).all() and 0.1 < np.abs(w).max() < 10


def _legacy_header() -> bytes:
    return b"".join(pickle.dumps(obj, protocol=2) for obj in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))


class _MakesFolder:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_reader_refuses_foreign_globals(tmp_path):
    marker = tmp_path / "created-by-pickle"
    bad = tmp_path / "bad.pth"
    bad.write_bytes(_legacy_header() + pickle.dumps({"w": _MakesFolder(str(marker))}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        mnv2.load_state_dict(bad)
    assert not marker.exists()


def test_reader_rejects_truncated_and_zip_files(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(mnv2.PACKAGE.path().read_bytes()[: 1 << 20])
    with pytest.raises(UsageError, match="truncated"):
        mnv2.load_state_dict(truncated)
    zipped = tmp_path / "zipped.pth"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}))
    with pytest.raises(UsageError, match="zip"):
        mnv2.load_state_dict(zipped)


# --- the graph ---------------------------------------------------------------------------------------

def test_graph_looks_like_an_unoptimized_export(model, state_dict):
    ops = [node.op_type for node in model.graph]
    counts = {op: ops.count(op) for op in set(ops)}
    assert counts == {"Conv": 52, "BatchNormalization": 52, "Clip": 35, "Add": 10,
                      "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    (x,), (logits,) = model.graph.inputs, model.graph.outputs
    assert (x.name, x.dtype, str(x.shape)) == ("pixel_values", ir.DataType.FLOAT, "[batch,3,224,224]")
    assert (logits.name, logits.dtype, str(logits.shape)) == ("logits", ir.DataType.FLOAT, "[batch,1000]")

    depthwise = 0
    for conv in (node for node in model.graph if node.op_type == "Conv"):
        assert len(conv.inputs) == 2  # no bias: BatchNormalization is a node of its own
        assert [use.node.op_type for use in conv.outputs[0].uses()] == ["BatchNormalization"]
        group = conv.attributes["group"].value
        if group > 1:
            depthwise += 1
            assert conv.inputs[1].const_value.shape[1] == 1 and group == conv.inputs[1].shape[0]
    assert depthwise == 17
    for clip in (node for node in model.graph if node.op_type == "Clip"):
        assert [v.const_value.numpy().item() for v in clip.inputs[1:]] == [0.0, 6.0]
    total = sum(v.const_value.size for v in model.graph.initializers.values())
    assert total == sum(v.size for k, v in state_dict.items() if "num_batches" not in k) + 2  # + Clip's bounds


def test_classifies_skimage_photos(model):
    x = np.stack([mnv2.preprocess(skimage.data.chelsea()), mnv2.preprocess(skimage.data.coffee())])
    (logits,) = _session(model).run(None, {"pixel_values": x})
    assert logits.shape == (2, 1000)
    cat, coffee = _softmax(logits.astype(np.float64))
    assert cat.argmax() == 285 and cat[285] > 0.5  # Egyptian cat (measured 0.70)
    assert cat[[281, 282, 285]].sum() > 0.95  # tabby, tiger cat, Egyptian cat (measured 0.99)
    assert coffee.argmax() == 967 and coffee[967] > 0.9  # espresso (measured 0.99)


def test_first_block_matches_numpy(state_dict):
    """Conv 3x3 stride 2 + BatchNormalization + Clip, computed naively in numpy from the checkpoint."""
    model = load_model(build_cached(mnv2.ENTRY))  # a copy of its own: it gains an output
    clip = next(node for node in model.graph if node.op_type == "Clip")
    bn = clip.inputs[0].producer()
    conv = bn.inputs[0].producer()
    assert (conv.op_type, bn.op_type, conv.inputs[0]) == ("Conv", "BatchNormalization", model.graph.inputs[0])
    model.graph.outputs.append(clip.outputs[0])

    x = mnv2.preprocess(skimage.data.chelsea())[None]
    _, got = _session(model).run(None, {"pixel_values": x})

    sd = {k: v.astype(np.float64) for k, v in state_dict.items() if k.startswith("features.0.")}
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    y = np.einsum("bchwij,ocij->bohw", patches, sd["features.0.0.weight"])
    bn = {k: sd[f"features.0.1.{k}"][:, None, None] for k in ("weight", "bias", "running_mean", "running_var")}
    y = (y - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-5)
    want = np.clip(y * bn["weight"] + bn["bias"], 0, 6)

    assert got.shape == want.shape == (1, 32, 112, 112)
    assert (want == 0).mean() > 0.1  # the clip is exercised (its upper bound 6 is not reached here)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# --- the image data ----------------------------------------------------------------------------------

def test_preprocess_matches_torchvision_arithmetic():
    gray = np.full((300, 451, 3), (51, 102, 204), dtype=np.uint8)  # a flat colour survives any resize
    out = mnv2.preprocess(gray)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    want = (np.array([51, 102, 204]) / 255 - mnv2.MEAN) / mnv2.STD
    np.testing.assert_allclose(out[:, 0, 0], want, atol=1e-5)
    np.testing.assert_allclose(out, np.broadcast_to(want[:, None, None], out.shape), atol=1e-5)
    assert mnv2.preprocess(np.zeros((500, 240, 3), np.uint8)).shape == (3, 224, 224)  # portrait
    with pytest.raises(ValueError, match="RGB"):
        mnv2.preprocess(np.zeros((224, 224), np.uint8))


def test_image_data_splits_are_disjoint_and_deterministic():
    assert not set(mnv2.PHOTOS["calibration"]) & set(mnv2.PHOTOS["evaluation"])
    n_photos = len(mnv2.PHOTOS["calibration"])
    calib = mnv2.image_data("calibration", n_photos + 2)["pixel_values"]
    assert calib.shape == (n_photos + 2, 3, 224, 224) and calib.dtype == np.float32
    assert np.array_equal(mnv2.image_data("calibration", n_photos + 1)["pixel_values"], calib[:-1])
    # The extra samples are crops of the first photos, not copies of them.
    for extra in range(n_photos, n_photos + 2):
        assert np.abs(calib[extra] - calib[extra - n_photos]).mean() > 0.1
    # Normalized like ImageNet: roughly zero-centred, unit spread.
    assert np.abs(calib.mean()) < 1 and 0.3 < calib.std() < 2

    evaluation = mnv2.image_data("evaluation", 2)["pixel_values"]  # chelsea, coffee
    distances = np.abs(calib[:, None] - evaluation[None]).mean(axis=(2, 3, 4))
    assert distances.min() > 0.1
    with pytest.raises(ValueError, match="split"):
        mnv2.image_data("train")


# --- INT8 on the CPU it runs on ----------------------------------------------------------------------

def _integer_vs_fake_quant_sqnr(model_path, x) -> float:
    """SQNR of ONNX Runtime's integer kernels (Q/DQ groups fused) against the same Q/DQ graph run op by op in
    float. Fused groups round their requantization differently, so even exact kernels stay near 30 dB over
    52 layers; saturating ones fall far below."""
    ort = onnxruntime()
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        runs.append(ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
                    .run(None, {"pixel_values": x})[0].astype(np.float64))
    fused, fake = runs
    return float(10 * np.log10(np.sum(fake**2) / np.sum((fused - fake) ** 2)))


def test_default_int8_weights_run_exactly_on_integer_kernels(tmp_path):
    import qcompile
    from qcompile.targets.x86 import has_vnni

    np.savez(tmp_path / "calib.npz", **mnv2.image_data("calibration", 8))
    x = mnv2.image_data("evaluation", 4)["pixel_values"]
    for cpu in ("any", "vnni"):
        path = qcompile.compile(build_cached(mnv2.ENTRY), recipe="w8a8", calib=str(tmp_path / "calib.npz"),
                                options={"cpu": cpu}).save(tmp_path / f"{cpu}.onnx")
        sqnr = _integer_vs_fake_quant_sqnr(path, x)
        if cpu == "any":
            assert sqnr > 28  # measured 32.4 dB
        elif not has_vnni():  # full-range weights: the trap the default avoids, seen on this CPU
            assert sqnr < 20  # measured 11.8 dB
