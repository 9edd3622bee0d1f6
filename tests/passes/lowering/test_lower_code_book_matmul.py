"""NF4 weights as BlockQuantMatMul takes them: the code book as int8 levels, the absmax values times 1 / 127, 8-bit
ones kept 8-bit."""
import numpy as np
import pytest

from qcompile.decisions import NF4
from qcompile.ops import block_quant_matmul as op
from qcompile.passes.analysis.assign_block_specs import nf4_spec
from qcompile.passes.lowering.lower_code_book_matmul import int8_code_book, packed_inputs

RNG = np.random.default_rng(5)


def test_nf4_as_int8_levels_keeps_its_order_and_ends():
    book, step = int8_code_book(NF4.values)
    assert book[0] == -127 and book[-1] == 127 and book[7] == 0 and step == pytest.approx(1 / 127)
    assert (np.diff(book.astype(int)) > 0).all()
    assert np.abs(book * step - np.array(NF4.values)).max() <= 0.5 / 127


@pytest.mark.parametrize("axis, double_quant", [(0, True), (0, False), (1, True)])
def test_the_packed_weight_decodes_to_nf4_within_half_a_level(axis, double_quant):
    k, n, block_size = 192, 300, 64
    weight = RNG.standard_normal((k, n) if axis == 0 else (n, k)).astype(np.float32)
    weight[..., 5] *= 20  # blocks of very different absmax
    spec = nf4_spec(weight, axis, block_size, 256 if double_quant else None)
    inputs, attributes = packed_inputs(weight, spec)
    assert attributes == {"K": k, "N": n, "bits": 4, "block_size": block_size,
                          **({"scale_block": 256} if double_quant else {})}
    assert (inputs["scales"] is None) == double_quant and inputs["zero_points"] is None
    scales = op.EightBitScales(inputs["scale_levels"], inputs["scale_scales"], inputs["scale_zero_points"],
                               attributes["scale_block"]) if double_quant else inputs["scales"]
    if double_quant:
        assert inputs["scale_levels"].dtype == np.uint8 and inputs["scale_levels"].size == n * k // block_size
    levels, points = op.unpack_weight(inputs["B"], None, n, k // block_size, 4, block_size, inputs["code_book"])
    decoded = (op.float_scales(scales, n, k // block_size)[..., None] * (levels - points[..., None])).reshape(n, k)
    nf4 = spec.dequantize(spec.quantize(weight))
    nf4_rows = nf4.T if axis == 0 else nf4
    absmax = np.repeat(spec.stored_scale().T if axis == 0 else spec.stored_scale(), block_size, axis=1)
    assert np.abs(decoded - nf4_rows).max() > 0  # the int8 code book is not NF4's float one
    assert (np.abs(decoded - nf4_rows) <= absmax * (0.5 / 127) * (1 + 1e-5) + 1e-7).all()
