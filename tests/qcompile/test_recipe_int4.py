"""`w4a16-rtn` end to end: every MatMul / Gemm weight in 4-bit blocks, lowered for the target, and run."""
import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile import kernels
from qcompile.errors import UsageError
from qcompile.graph import constant_array
from qcompile.inspection import describe
from qcompile.io import save_model
from qcompile.models import synthetic
from qcompile.target_check import target_problems
from qcompile.targets import TARGETS
from qcompile.verify import worst_sqnr_db
from tests.helpers import NBITS_8, parse, random_feed, run

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


@pytest.fixture
def block(tmp_path):
    path = tmp_path / "block.onnx"
    save_model(synthetic.transformer_block(), path)
    return path


def _outputs(model: ir.Model, feed) -> list[np.ndarray]:
    return run(model, feed, {"session.qdq_matmulnbits_accuracy_level": "0"})


def test_every_linear_runs_as_matmulnbits_close_to_fp32(block):
    result = qcompile.compile(block, recipe="w4a16-rtn")
    nbits = {n.name: n for n in result.model.graph if n.op_type == "MatMulNBits"}
    assert sorted(nbits) == sorted(LINEARS)
    assert {n.attributes.get_int("block_size") for n in nbits.values()} == {32}
    assert {n.attributes.get_int("accuracy_level") for n in nbits.values()} == {4}
    precisions = {layer["name"]: layer["precision"] for layer in result.report["layers"]}
    assert all(precisions[name] == "w:int4 a:fp32" for name in LINEARS), precisions
    feed = random_feed(result.model, batch=2, seq=6)
    reference = run(qcompile.compile(block, recipe="canonicalize").model, feed)
    # random weights in blocks of 32 on 16 levels: ~20 dB each, a little less through the block
    assert 14 < worst_sqnr_db(reference, run(result.model, feed)) < 30


def test_the_decomposed_lowering_computes_what_matmulnbits_does(block):
    options = {"symmetric": False, "block_size": 16, "accuracy_level": 0}
    contrib = qcompile.compile(block, recipe="w4a16-rtn", options=options).model
    portable = qcompile.compile(block, recipe="w4a16-rtn", target="portable", options=options).model
    assert portable.opset_imports[""] == 21 and "com.microsoft" not in portable.opset_imports
    dequantize = [n for n in portable.graph if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == len(LINEARS) and {n.attributes.get_int("block_size") for n in dequantize} == {16}
    assert {n.inputs[0].dtype for n in dequantize} == {ir.DataType.UINT4}
    feed = random_feed(contrib, batch=2, seq=6)
    for a, b in zip(_outputs(contrib, feed), _outputs(portable, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_symmetric_blocks_behind_dequantize_linear_take_positive_scales_at_about_the_same_accuracy(block):
    """MatMulNBits' blocks map their extreme to -8 by a negative scale; DequantizeLinear's stay positive."""
    contrib = qcompile.compile(block, recipe="w4a16-rtn", options={"accuracy_level": 0}).model
    portable = qcompile.compile(block, recipe="w4a16-rtn", target="portable").model
    scales = [constant_array(n.inputs[1]) for n in portable.graph if n.op_type == "DequantizeLinear"]
    assert len(scales) == len(LINEARS) and all(np.all(s > 0) for s in scales)
    assert any(np.any(constant_array(n.inputs[2]) < 0) for n in contrib.graph if n.op_type == "MatMulNBits")
    feed = random_feed(contrib, batch=2, seq=6)
    reference = run(qcompile.compile(block, recipe="canonicalize").model, feed)
    contrib_db, portable_db = (worst_sqnr_db(reference, _outputs(m, feed)) for m in (contrib, portable))
    assert abs(contrib_db - portable_db) < 1.5


TIED = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[B, S] ids) => (float[B, S, 40] logits) <float[40, 32] embedding = {%s}> {
    h = Gather(embedding, ids)
    t = Transpose <perm = [1, 0]> (embedding)
    logits = MatMul(h, t)
}
""" % ", ".join(f"{v:.4f}" for v in np.random.default_rng(3).standard_normal(40 * 32))


@pytest.fixture
def tied(tmp_path):
    """The tied-head model saved, token ids, and its fp32 logits on them."""
    path = tmp_path / "tied.onnx"
    save_model(parse(TIED), path)
    ids = np.array([[1, 5, 39]], np.int64)
    return path, ids, run(parse(TIED), {"ids": ids})[0]


@NBITS_8
def test_a_tied_head_gets_its_own_8bit_copy_and_the_gathered_table_int8_rows(tied):
    path, ids, expected = tied
    result = qcompile.compile(path, recipe="w4a16-rtn")
    head = list(result.model.graph)[-1]
    assert head.op_type == "MatMulNBits" and head.attributes.get_int("bits") == 8
    assert {layer["precision"] for layer in result.report["layers"]} == {"w:int8 a:fp32"}
    assert {v.dtype for v in result.model.graph.initializers.values()} >= {ir.DataType.INT8}  # the table's rows
    assert worst_sqnr_db([expected], _outputs(result.model, {"ids": ids})) > 30

    four_bits = qcompile.compile(path, recipe="w4a16-rtn", options={"embeddings": False, "head_bits": 4}).model
    assert [n.op_type for n in four_bits.graph] == ["Gather", "MatMulNBits"]
    assert list(four_bits.graph)[-1].attributes.get_int("bits") == 4
    assert four_bits.graph.initializers["embedding"].dtype == ir.DataType.FLOAT
    assert 14 < worst_sqnr_db([expected], _outputs(four_bits, {"ids": ids})) < 30


EMBEDDING = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[B, S] ids) => (float[B, S, 64] rows) <float[40, 64] embedding = {%s}> {
    rows = Gather(embedding, ids)
}
""" % ", ".join(f"{v:.4f}" for v in np.random.default_rng(4).standard_normal(40 * 64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_4_bit_embedding_rows_are_gathered_by_gather_block_quantized_as_numpy_dequantizes_them(tmp_path, symmetric):
    from qcompile.passes.analysis.assign_block_specs import block_spec

    path = tmp_path / "embedding.onnx"
    save_model(parse(EMBEDDING), path)
    result = qcompile.compile(path, recipe="w4a16-rtn", options={"embedding_bits": 4, "symmetric": symmetric})
    assert [(n.op_type, n.domain) for n in result.model.graph] == [("GatherBlockQuantized", "com.microsoft")]
    stored = {v.dtype for v in result.model.graph.initializers.values()}
    assert stored == ({ir.DataType.INT4, ir.DataType.FLOAT} if symmetric else {ir.DataType.UINT4, ir.DataType.FLOAT})
    assert result.report["size_bytes"]["before"] > 0
    table = constant_array(parse(EMBEDDING).graph.initializers["embedding"])
    spec = block_spec(table, 1, 32, symmetric, negative_scales=False)
    ids = np.array([[0, 7, 39, 7], [3, 1, 2, 38]], np.int64)
    rows = run(result.model, {"ids": ids})[0]
    np.testing.assert_allclose(rows, spec.dequantize(spec.quantize(table)).astype(np.float32)[ids], rtol=1e-6,
                               atol=1e-7)
    assert 0.1 < np.abs(rows - table[ids]).max() < 0.5  # 4-bit steps, not INT8 rows


def test_4_bit_embeddings_need_gather_block_quantized_and_a_row_the_block_divides(tmp_path, tied):
    path = tmp_path / "embedding.onnx"
    save_model(parse(EMBEDDING), path)
    with pytest.raises(UsageError, match="standard ONNX's Gather takes no 4-bit tables"):
        qcompile.compile(path, recipe="w4a16-rtn", target="portable", options={"embedding_bits": 4})
    with pytest.raises(UsageError, match="embedding_bits: expected 4 or 8"):
        qcompile.compile(path, recipe="nf4", options={"embedding_bits": 2})
    with pytest.raises(UsageError, match="embeddings=false keeps them float"):
        qcompile.compile(path, recipe="w4a16-rtn", options={"embedding_bits": 4, "embeddings": False})
    result = qcompile.compile(path, recipe="w4a16-rtn", options={"embedding_bits": 4, "block_size": 128})
    assert any("not a multiple of the block of 128" in note for note in result.report["notes"])
    assert [n.op_type for n in result.model.graph][0] == "Gather"


@NBITS_8
def test_hqq_keeps_integer_zero_points_on_an_8_bit_head_and_runs(tied):
    """MatMulNBits takes float zero points at 4 bits only."""
    path, ids, expected = tied
    result = qcompile.compile(path, recipe="w4a16-hqq", options={"head_bits": 4})
    assert any("float zero points (HQQ's)" in note for note in result.report["notes"])
    model = qcompile.compile(path, recipe="w4a16-hqq").model
    head = list(model.graph)[-1]
    assert head.attributes.get_int("bits") == 8 and head.inputs[3].dtype == ir.DataType.UINT8
    assert worst_sqnr_db([expected], _outputs(model, {"ids": ids})) > 30


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda", "portable", "tensorrt"])
def test_every_target_takes_what_it_gets(block, target):
    model = qcompile.compile(block, recipe="w4a16-rtn", target=target).model
    assert target_problems(model, TARGETS[target]) == []


@pytest.mark.parametrize("target, options, message", [
    ("tensorrt", {"symmetric": False}, "zero point 0 only"),
    ("portable", {"kernel": "contrib"}, "takes no com.microsoft ops"),
    ("ort-cpu", {"block_size": 48}, "block_size: expected one of 16, 32, 64, 128, 256"),
    ("ort-cpu", {"accuracy_level": 5}, "accuracy_level: expected one of"),
    ("ort-cpu", {"kernel": "qnn"}, "kernel: expected one of auto, contrib, custom, decomposed"),
    ("ort-cuda", {"kernel": "custom"}, "no kernels for ONNX Runtime CUDA"),
    ("tensorrt", {"kernel": "custom"}, "no kernels for TensorRT"),
    ("ort-cpu", {"head_bits": 2}, "head_bits: expected 4 or 8"),
])
def test_options_the_target_cannot_take_are_usage_errors(block, target, options, message):
    with pytest.raises(UsageError, match=message):
        qcompile.compile(block, recipe="w4a16-rtn", target=target, options=options)


@pytest.mark.parametrize("recipe, options", [("w4a16-rtn", {"symmetric": True}), ("w4a16-hqq", {"head_bits": 4})])
def test_kernel_custom_lowers_to_qcompiles_op_and_names_the_library(block, kernels_library, recipe, options):
    result = qcompile.compile(block, recipe=recipe, options={"kernel": "custom", **options})
    ops = describe(result.model)["op_histogram"]
    assert ops.get("ai.qcompile::BlockQuantMatMul", 0) >= 4 and not any("MatMulNBits" in op for op in ops)
    assert describe(result.model)["custom_op_library"] == "ai.qcompile: BlockQuantMatMul"
    feed = random_feed(result.model)
    expected, custom = run(ir.load(block), feed), run(result.model, feed)
    # the same blocks on MatMulNBits (activations quantized alike), or for HQQ, whose zero points are integers here
    # and floats on MatMulNBits, on DequantizeLinear (activations float)
    other = qcompile.compile(block, recipe=recipe, options={**options, "kernel": "decomposed" if "hqq" in recipe
                                                                       else "contrib"}).model
    if recipe == "w4a16-rtn":
        np.testing.assert_allclose(custom[0], run(other, feed)[0], rtol=0.02, atol=0.02)
    assert worst_sqnr_db(expected, custom) > worst_sqnr_db(expected, run(other, feed)) - 1


def test_kernel_custom_says_how_to_get_what_it_lacks(block, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "empty-cache"))
    kernels.source_digest.cache_clear()
    with pytest.raises(UsageError, match=r"not built: run `qcompile kernels build`"):
        qcompile.compile(block, recipe="w4a16-rtn", options={"kernel": "custom"})


def test_hqq_takes_asymmetric_blocks_only(block):
    with pytest.raises(UsageError, match="symmetric blocks do not have"):
        qcompile.compile(block, recipe="w4a16-hqq", options={"symmetric": True})


def _correlated(rows: int, k: int, seed: int) -> np.ndarray:
    """Rows of k features mixing a few strong directions, as real layer inputs do (GPTQ gains nothing on white
    noise, whose Hessian is the identity)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).standard_normal((k, k)) * np.linspace(2.0, 0.05, k)[:, None]
    return (rng.standard_normal((rows, k)) @ mixing).astype(np.float32)


TWO_LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 96] x) => (float[N, 24] y) <float[96, 64] w1 = {%s}, float[24, 64] w2 = {%s}> {
    h = MatMul(x, w1)
    a = Relu(h)
    y = Gemm <transB = 1> (a, w2)
}
""" % tuple(", ".join(f"{v:.4f}" for v in np.random.default_rng(seed).standard_normal(size))
            for seed, size in ((1, 96 * 64), (2, 24 * 64)))


@pytest.fixture
def two_layers(tmp_path):
    """The model, calibration data, and other samples with their fp32 outputs."""
    path = tmp_path / "two.onnx"
    save_model(parse(TWO_LAYERS), path)
    np.savez(tmp_path / "calib.npz", x=_correlated(256, 96, seed=1))
    other = {"x": _correlated(64, 96, seed=2)}
    return path, str(tmp_path / "calib.npz"), other, run(parse(TWO_LAYERS), other)


@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
@pytest.mark.parametrize("options", [{"block_size": 32}, {"block_size": 16, "symmetric": False, "act_order": True,
                                                          "stages": 2}])
def test_gptq_beats_round_to_nearest_on_other_samples_and_runs_as_decided(two_layers, target, options):
    path, calib, other, expected = two_layers
    options = {**options, "head_bits": 4, **({"accuracy_level": 0} if target == "ort-cpu" else {})}
    gptq = qcompile.compile(path, recipe="w4a16-gptq", calib=calib, target=target, options=options)
    rtn = qcompile.compile(path, recipe="w4a16-rtn", target=target, options={
        k: v for k, v in options.items() if k not in ("act_order", "stages")})
    assert any("GPTQ: 2 weight(s) rounded" in note for note in gptq.report["notes"])
    grid = "int4" if options.get("symmetric", True) else "uint4"
    assert {layer["precision"] for layer in gptq.report["layers"]} == {f"w:{grid} a:fp32"}
    gptq_db, rtn_db = (worst_sqnr_db(expected, _outputs(m, other)) for m in (gptq.model, rtn.model))
    assert gptq_db > rtn_db + 1.5, (gptq_db, rtn_db)


def test_gptq_runs_split_by_the_hessian_budget_still_measure_one_group_on_the_float_model(two_layers, monkeypatch):
    """With one group (stages=1), every layer's input comes from the float model, however many calibration runs
    the Hessian budget needs: the second run must not see the first run's rounded weights."""
    from qcompile.passes.analysis import round_blocks_gptq

    path, calib, _, _ = two_layers
    options = {"block_size": 32, "head_bits": 4}
    together = qcompile.compile(path, recipe="w4a16-gptq", calib=calib, target="portable", options=options)
    monkeypatch.setattr(round_blocks_gptq, "HESSIAN_BUDGET", 96 * 96 * 8)  # one Hessian per run
    apart = qcompile.compile(path, recipe="w4a16-gptq", calib=calib, target="portable", options=options)
    assert any("in 1 stage(s) of 2 calibration run(s)" in note for note in apart.report["notes"])
    for name, tensor in together.model.graph.initializers.items():
        np.testing.assert_array_equal(tensor.const_value.numpy(), apart.model.graph.initializers[name].const_value.numpy())


def test_gptq_without_calibration_data_suggests_the_recipes_that_need_none(block):
    with pytest.raises(UsageError, match="w4a16-gptq calibrates.*w4a16-rtn or w4a16-hqq"):
        qcompile.compile(block, recipe="w4a16-gptq")


# x * gamma (an RMSNorm's weight) -> MatMul -> Relu -> MatMul: token activations, rank 3, as AWQ expects.
NORMED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 64] x) => (float[B, S, 32] y) <float[64] gamma = {%s}, float[64, 128] w1 = {%s},
                                              float[128, 32] w2 = {%s}> {
    n = Mul(x, gamma)
    h = MatMul(n, w1)
    a = Relu(h)
    y = MatMul(a, w2)
}
""" % tuple(", ".join(f"{v:.4f}" for v in np.random.default_rng(seed).uniform(0.5, 1.5, size) * scale)
            for seed, size, scale in ((3, 64, 1.0), (4, 64 * 128, 1.0), (5, 128 * 32, 1.0)))


def _outlier_channels(samples: int, seed: int) -> np.ndarray:
    """Token activations whose first 4 of 64 channels run 20x larger than the rest, as LLMs' do."""
    x = np.random.default_rng(seed).standard_normal((samples, 8, 64)).astype(np.float32)
    x[..., :4] *= 20
    return x


@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
def test_awq_scales_the_active_channels_into_the_norm_and_beats_round_to_nearest(tmp_path, target):
    path = tmp_path / "normed.onnx"
    save_model(parse(NORMED), path)
    np.savez(tmp_path / "calib.npz", x=_outlier_channels(32, seed=1))
    other = {"x": _outlier_channels(16, seed=2)}
    expected = run(parse(NORMED), other)
    options = {"block_size": 32, "head_bits": 4, **({"accuracy_level": 0} if target == "ort-cpu" else {})}
    awq = qcompile.compile(path, recipe="w4a16-awq", calib=str(tmp_path / "calib.npz"), target=target,
                           options=options)
    rtn = qcompile.compile(path, recipe="w4a16-rtn", target=target, options=options)
    assert any(note.startswith("AWQ: 2 of 2 MatMul inputs scaled") for note in awq.report["notes"])
    # the 1/s of the first MatMul's input went into gamma; the second's, after a Relu, needs a Mul
    assert [n.op_type for n in awq.model.graph if n.op_type == "Mul"] == ["Mul", "Mul"]
    awq_db, rtn_db = (worst_sqnr_db(expected, _outputs(m, other)) for m in (awq.model, rtn.model))
    assert awq_db > rtn_db + 1.0, (awq_db, rtn_db)


def test_awq_without_calibration_data_suggests_the_recipes_that_need_none(block):
    with pytest.raises(UsageError, match="w4a16-awq calibrates.*w4a16-rtn or w4a16-hqq"):
        qcompile.compile(block, recipe="w4a16-awq")


def _unpack_high_first(packed: np.ndarray, count: int) -> np.ndarray:
    """MatMulBnb4's B as its documentation defines it, read back independently of the packer."""
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F
    return codes[:count]


def _nf4_reference(path, block_size: int, double_quant: bool) -> ir.Model:
    """The model with every MatMul weight replaced by its NF4 values, computed in numpy from the spec."""
    from qcompile.passes.analysis.assign_block_specs import nf4_spec

    model = qcompile.compile(path, recipe="canonicalize").model
    for node in model.graph:
        if node.op_type == "MatMul" and (weight := constant_array(node.inputs[1])) is not None:
            spec = nf4_spec(weight, 0, block_size, 256 if double_quant else None)
            node.inputs[1].const_value = ir.tensor(spec.dequantize(spec.quantize(weight)), name=node.inputs[1].name)
    return model


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_runs_as_matmulbnb4_and_decoded_by_standard_ops_exactly_as_numpy_decodes_it(block, double_quant,
                                                                                        tmp_path):
    from qcompile.io import load_model
    from qcompile.layers import layer_precisions

    options = {"double_quant": double_quant, "block_size": 16}
    contrib = qcompile.compile(block, recipe="nf4", options=options)
    portable = qcompile.compile(block, recipe="nf4", target="portable", options=options).model
    nodes = {n.name: n for n in contrib.model.graph if n.op_type == "MatMulBnb4"}
    assert sorted(nodes) == sorted(LINEARS)
    assert {layer["precision"] for layer in contrib.report["layers"] if layer["name"] in LINEARS} == {"w:nf4 a:fp32"}
    assert "com.microsoft" not in portable.opset_imports
    saved = save_model(portable, tmp_path / "portable.onnx")  # inspect reads the code book's mark from the file
    assert {r["precision"] for r in layer_precisions(load_model(saved)) if r["name"] in LINEARS} == {"w:nf4 a:fp32"}
    absmax = nodes["q_proj"].inputs[2].producer()  # decoded in the graph where double-quantized
    assert (absmax.op_type, absmax.inputs[0].producer().op_type if double_quant else None) == (
        "Reshape", "DequantizeLinear" if double_quant else None)
    feed = random_feed(contrib.model, batch=2, seq=6)
    expected = run(_nf4_reference(block, 16, double_quant), feed)
    for model in (contrib.model, portable):
        for a, b in zip(expected, run(model, feed)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_with_kernel_custom_reads_8_bit_scales_and_computes_nf4_up_to_int8_rounding(block, kernels_library,
                                                                                         double_quant):
    options = {"double_quant": double_quant, "block_size": 32}
    result = qcompile.compile(block, recipe="nf4", options={**options, "kernel": "custom"})
    nodes = {n.name: n for n in result.model.graph if n.op_type == "BlockQuantMatMul"}
    assert sorted(nodes) == sorted(LINEARS) and not any(n.op_type == "MatMulBnb4" for n in result.model.graph)
    assert {layer["precision"] for layer in result.report["layers"] if layer["name"] in LINEARS} == {
        "w:nf4 a:int8-blocks"}
    assert describe(result.model)["custom_op_library"] == "ai.qcompile: BlockQuantMatMul"
    q_proj = nodes["q_proj"]
    assert (q_proj.inputs[2] is None) == double_quant  # the 8-bit scales go in as stored, not decoded to floats
    assert q_proj.inputs[4].dtype == ir.DataType.INT8  # the code book
    feed = random_feed(result.model, batch=2, seq=6)
    expected = run(_nf4_reference(block, 32, double_quant), feed)  # NF4's weights, float activations
    custom = run(result.model, feed)
    np.testing.assert_allclose(custom[0], expected[0], rtol=0.05, atol=0.05 * np.abs(expected[0]).max())
    assert worst_sqnr_db(expected, custom) > 25  # int8 activations per block, the code book's rounding


def test_nf4_codes_are_packed_high_nibble_first_along_the_flattened_n_by_k_weight(block):
    from qcompile.passes.analysis.assign_block_specs import nf4_spec

    model = qcompile.compile(block, recipe="nf4", options={"double_quant": False, "block_size": 16}).model
    original = constant_array(qcompile.compile(block, recipe="canonicalize").model.graph.initializers["fc1.weight"])
    node = next(n for n in model.graph if n.name == "fc1")
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    spec = nf4_spec(original, 0, 16, None)
    codes = _unpack_high_first(constant_array(node.inputs[1]), n * k).reshape(n, k)
    np.testing.assert_array_equal(codes, spec.quantize(original).astype(np.uint8).T)
    book = np.asarray(spec.grid.values)
    # the nearest code: no other code is closer to the weight over its block's absmax
    real = original.T / np.repeat(spec.scale.T, 16, axis=1)
    assert np.all(np.abs(book[codes] - real) <= np.min(np.abs(book[None, None, :] - real[..., None]), axis=-1) + 1e-7)


def test_nf4_double_quantization_stores_8_bit_scales_close_to_the_absmax(block):
    from qcompile.passes.analysis.assign_block_specs import nf4_spec

    weight = constant_array(qcompile.compile(block, recipe="canonicalize").model.graph.initializers["fc1.weight"])
    spec = nf4_spec(weight, 0, 16, 256)
    assert spec.granularity.scale_spec.grid.bits == 8
    np.testing.assert_allclose(spec.stored_scale(), spec.scale, rtol=0.02)
    one_block = weight.copy()
    one_block[:16, 0] = 0.0  # an all-zero block: a finite, typical scale, decoded exactly to zeros
    zeroed = nf4_spec(one_block, 0, 16, 256)
    assert 0 < zeroed.scale[0, 0] <= np.abs(weight).max()
    np.testing.assert_array_equal(zeroed.dequantize(zeroed.quantize(one_block))[:16, 0], 0.0)


def test_a_k_not_a_multiple_of_the_block_takes_a_smaller_nf4_block_and_pads_integer_blocks(tmp_path):
    path = tmp_path / "odd.onnx"
    save_model(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 96] x) => (float[B, 8] y) <float[96, 8] w = {%s}> {
        h = MatMul(x, w)
        y = Relu(h)
    }
    """ % ", ".join(["0.5"] * 96 * 8)), path)
    result = qcompile.compile(path, recipe="nf4", options={"block_size": 64})  # K = 96: blocks of 32
    node = next(n for n in result.model.graph if n.op_type == "MatMulBnb4")
    assert node.attributes.get_int("block_size") == 32
    assert any("1 NF4 weight(s) in blocks of 32: K is not a multiple of 64" in note for note in result.report["notes"])
    integer = qcompile.compile(path, recipe="w4a16-rtn", options={"block_size": 64})  # a short last block
    assert [n.op_type for n in integer.model.graph] == ["MatMulNBits", "Relu"]
    assert any("the last block of each column is short" in note for note in integer.report["notes"])


def test_nf4_blocks_below_what_kernel_custom_takes_go_to_matmulbnb4(tmp_path, kernels_library):
    path = tmp_path / "narrow.onnx"
    save_model(parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 48] x) => (float[B, 8] y) <float[48, 64] w = {%s}, float[64, 8] v = {%s}> {
        h = MatMul(x, w)
        y = MatMul(h, v)
    }
    """ % (", ".join(["0.5"] * 48 * 64), ", ".join(["0.25"] * 64 * 8))), path)
    result = qcompile.compile(path, recipe="nf4", options={"block_size": 32, "kernel": "custom", "head_bits": 4})
    layers = [n.op_type for n in result.model.graph if n.op_type in ("MatMulBnb4", "BlockQuantMatMul")]
    assert layers == ["MatMulBnb4", "BlockQuantMatMul"]  # K = 48: blocks of 16
    assert np.isfinite(run(result.model, random_feed(result.model))[0]).all()
    with pytest.raises(UsageError, match="block_size=16: qcompile's BlockQuantMatMul .* takes blocks of 32, 64"):
        qcompile.compile(path, recipe="w4a16-rtn", options={"block_size": 16, "kernel": "custom"})


@NBITS_8
def test_nf4_keeps_an_lm_head_at_8_bits_and_runs(tied):
    path, ids, expected = tied
    model = qcompile.compile(path, recipe="nf4", options={"block_size": 32}).model
    assert list(model.graph)[-1].op_type == "MatMulNBits"
    assert worst_sqnr_db([expected], _outputs(model, {"ids": ids})) > 30


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w4a16-hqq", "w4a16-gptq", "w4a16-awq", "nf4"])
def test_degenerate_blocks_get_valid_scales_and_a_nan_weight_is_stored_as_zero(tmp_path, recipe):
    """A NaN, an all-zero block and a 1e6 outlier in one weight: finite outputs near those of the weight with the
    NaN as 0, and a report line."""
    weight = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    weight[3, 2], weight[40, 5], weight[:32, 7] = np.nan, 1e6, 0.0
    values = ", ".join("NaN" if np.isnan(v) else f"{v:.6g}" for v in weight.reshape(-1))
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 1, 64] x) => (float[B, 1, 8] y) <float[64, 8] w = {%s}> {
        h = MatMul(x, w)
        y = Relu(h)
    }"""
    save_model(parse(text % values), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((16, 1, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = qcompile.compile(tmp_path / "m.onnx", recipe=recipe, options={"head_bits": 4, "block_size": 32},
                              calib=str(tmp_path / "calib.npz"))
    assert any("1 weight(s) hold NaN values, stored as 0: w" in note for note in result.report["notes"])
    got = _outputs(result.model, {"x": x})[0]
    assert np.all(np.isfinite(got))
    expected = run(parse(text % values.replace("NaN", "0")), {"x": x})[0]
    assert worst_sqnr_db([expected], [got]) > 10
