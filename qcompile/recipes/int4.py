"""The INT4 family: block-wise 4-bit weight-only recipes (`w4a16-rtn`, `w4a16-hqq`, `w4a16-gptq`, `w4a16-awq`,
`nf4`), activations left float.

The weights of MatMul and Gemm layers (a tied LM head too, once given its own transposed copy) get one
scale, and asymmetric one zero point, per block along K; embedding tables are stored as INT8, one scale
per row, as in the INT8 recipes (`embeddings=false` keeps them float), or with `embedding_bits=4` as INT4 in
blocks along the row for ONNX Runtime's GatherBlockQuantized. They are lowered to ONNX Runtime's
`MatMulNBits` (``kernel=contrib``, ort-cpu and ort-cuda), to qcompile's own `BlockQuantMatMul` (``kernel=custom``,
ort-cpu, `qcompile.kernels`), or to opset 21's DequantizeLinear with ``block_size`` in front of the MatMul
(``kernel=decomposed``: portable, TensorRT). `nf4` puts the 4-bit layers on QLoRA's code book instead, lowered
to `MatMulBnb4`, to `BlockQuantMatMul` with the code book (``kernel=custom``), or decoded by standard ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile import kernels
from qcompile.errors import UsageError
from qcompile.ops import block_quant_matmul
from qcompile.passes.analysis.assign_block_specs import (BLOCK_DEQUANTIZE_OPSET, BLOCK_SIZES, AssignBlockSpecsPass,
                                                         BlockSpecOptions)
from qcompile.passes.analysis.choose_awq_scales import AWQOptions, ChooseAWQScalesPass
from qcompile.passes.analysis.fit_block_grids_hqq import FitBlockGridsHQQPass, HQQOptions
from qcompile.passes.analysis.round_blocks_gptq import GPTQOptions, RoundBlocksGPTQPass
from qcompile.passes.canonicalize.eliminate_dead_code import EliminateDeadCodePass
from qcompile.passes.canonicalize.upgrade_opset import PER_CHANNEL_OPSET
from qcompile.passes.lowering.dequantize_code_book_weights import DequantizeCodeBookWeightsPass
from qcompile.passes.lowering.lower_code_book_matmul import LowerCodeBookMatMulPass
from qcompile.passes.lowering.lower_gather_block_quantized import LowerGatherBlockQuantizedPass
from qcompile.passes.lowering.lower_matmul_bnb4 import LowerMatMulBnb4Pass
from qcompile.passes.lowering.lower_matmul_nbits import LowerMatMulNBitsPass, MatMulNBitsOptions
from qcompile.passes.lowering.quantize_weights import QuantizeWeightsPass
from qcompile.passes.transform.smooth_activations import SmoothActivationsPass
from qcompile.recipes.base import Recipe, Settings, option
from qcompile.recipes.canonical import canonicalize
from qcompile.recipes.embeddings import assign_embedding_specs, embeddings_option, gather_rows, untie

KERNELS = ("auto", "contrib", "custom", "decomposed")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
NF4_SCALE_BLOCK = 256  # absmax values per 8-bit scale (QLoRA's)


def embedding_bits_option():
    return option(8, "bits of embedding tables: 8 (INT8, one scale per row, every target) or 4 (INT4 in blocks of "
                     "block_size along each row: ONNX Runtime's GatherBlockQuantized, kernel=contrib only)")


@dataclass(frozen=True)
class W4A16Options:
    block_size: int = option(32, f"weights per scale along K: {', '.join(map(str, BLOCK_SIZES))}")
    symmetric: bool = option(True, "levels -8..7 around zero (true), or 0..15 with a zero point per block (false)")
    accuracy_level: int = option(4, "MatMulNBits' accuracy_level: 4 quantizes the activations to int8 per block "
                                    "and computes on integers (fast), 0 computes in float")
    kernel: str = option("auto", "how the 4-bit matmuls are lowered: contrib (ONNX Runtime's MatMulNBits), "
                                 "custom (qcompile's BlockQuantMatMul, ort-cpu, after `qcompile kernels build`), "
                                 "decomposed (DequantizeLinear with block_size, opset 21: standard ONNX), auto "
                                 "(contrib where the target takes contrib ops)")
    head_bits: int = option(8, "bits of the layers that write a model output (an LM head): 8 (a 4-bit head costs "
                               "small LMs most; MatMulNBits runs 8 bits on ONNX Runtime 1.22 and later) or 4")
    embeddings: bool = embeddings_option()
    embedding_bits: int = embedding_bits_option()


@dataclass(frozen=True)
class W4A16HQQOptions(W4A16Options):
    symmetric: bool = option(False, "HQQ fits each block's zero point: asymmetric blocks only (false)")


@dataclass(frozen=True)
class W4A16GPTQOptions(W4A16Options):
    damp: float = option(0.01, "GPTQ: fraction of the Hessian's mean diagonal added to it (more: closer to round to "
                               "nearest, steadier on little data)")
    act_order: bool = option(True, "GPTQ: round the input features in order of decreasing activation energy "
                                   "(the blocks' grids then come from round to nearest)")
    stages: int = option(1, "GPTQ: calibration runs; the layers in that many groups, each measured on the model "
                            "with the groups before it already rounded (the paper's order, one group per layer "
                            "input; slower, and no better on SmolLM2)")


@dataclass(frozen=True)
class NF4Options:
    block_size: int = option(64, f"weights per absmax along K (QLoRA: 64): {', '.join(map(str, BLOCK_SIZES))}; "
                                 f"a weight whose K is not a multiple gets the largest smaller block that divides K")
    double_quant: bool = option(True, f"absmax values stored in 8 bits, blocks of {NF4_SCALE_BLOCK} along N "
                                      f"(QLoRA's double quantization), or as floats (false)")
    accuracy_level: int = option(4, "MatMulNBits' accuracy_level, for the layers kept at 8 bits (head_bits)")
    kernel: str = option("auto", "how the NF4 matmuls are lowered: contrib (ONNX Runtime's MatMulBnb4), custom "
                                 "(qcompile's BlockQuantMatMul: the code book as int8 levels, activations int8 per "
                                 "block, 8-bit scales read as stored; ort-cpu, after `qcompile kernels build`), "
                                 "decomposed (the indexes decoded by Gather from the code book: standard ONNX, opset "
                                 "21), auto (contrib where the target takes contrib ops)")
    head_bits: int = option(8, "bits of the layers that write a model output (an LM head): 8 (integer blocks, "
                               "MatMulNBits from ONNX Runtime 1.22) or 4 (NF4)")
    embeddings: bool = embeddings_option()
    embedding_bits: int = embedding_bits_option()


def _embedding_block(settings: Settings, decomposed: bool) -> int | None:
    """The block of 4-bit embedding rows, or None for INT8 rows."""
    bits = settings.options.embedding_bits
    if bits not in (4, 8):
        raise UsageError(f"option embedding_bits: expected 4 or 8, got {bits}")
    if bits == 8:
        return None
    if not settings.options.embeddings:
        raise UsageError("option embedding_bits=4 stores embedding tables in 4 bits, and embeddings=false keeps "
                         "them float: drop one of the two")
    if decomposed:
        raise UsageError("option embedding_bits=4 needs ONNX Runtime's GatherBlockQuantized (kernel=contrib): "
                         "standard ONNX's Gather takes no 4-bit tables; use embedding_bits=8")
    return settings.options.block_size


def _kernel(settings: Settings) -> str:
    kernel = settings.options.kernel
    if kernel not in KERNELS:
        raise UsageError(f"option kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        return "contrib" if settings.target.contrib_ops else "decomposed"
    if kernel == "contrib" and not settings.target.contrib_ops:
        raise UsageError(f"option kernel=contrib: {settings.target.summary} takes no com.microsoft ops; "
                         f"use kernel=decomposed")
    if kernel == "custom":
        if kernels.DOMAIN not in settings.target.custom_op_domains:
            raise UsageError(f"option kernel=custom: qcompile's custom-op library has no kernels for "
                             f"{settings.target.summary} (CPU only so far); use kernel=contrib or kernel=decomposed")
        kernels.require_library()
    return kernel


def _block_options(settings: Settings, kernel: str, nf4: bool = False) -> BlockSpecOptions:
    options = settings.options
    symmetric = nf4 or options.symmetric
    if options.block_size not in BLOCK_SIZES:
        raise UsageError(f"option block_size: expected one of {', '.join(map(str, BLOCK_SIZES))}, "
                         f"got {options.block_size}")
    if kernel == "custom" and options.block_size not in block_quant_matmul.BLOCK_SIZES:
        raise UsageError(f"option block_size={options.block_size}: qcompile's BlockQuantMatMul (kernel=custom) takes "
                         f"blocks of {', '.join(map(str, block_quant_matmul.BLOCK_SIZES))}")
    if settings.target.symmetric_int8_only and not symmetric:
        raise UsageError(f"option symmetric=false: {settings.target.summary} takes 4-bit weights with zero point 0 "
                         f"only; use symmetric=true")
    if options.head_bits not in (4, 8):
        raise UsageError(f"option head_bits: expected 4 or 8, got {options.head_bits}")
    double_quant = nf4 and options.double_quant
    return BlockSpecOptions(block_size=options.block_size, symmetric=symmetric, exclude=settings.excluded,
                            block_dequantize=kernel == "decomposed", head_bits=options.head_bits, nf4=nf4,
                            scale_block=NF4_SCALE_BLOCK if double_quant else None)


def _w4a16(settings: Settings, scale: list[ir.passes.PassBase] = (), fit: list[ir.passes.PassBase] = (),
           nf4: bool = False) -> list[ir.passes.PassBase]:
    """The INT4 pipeline; ``scale`` rescales weights before their blocks are decided, ``fit`` refines those; ``nf4``:
    the 4-bit layers on the NF4 code book."""
    kernel = _kernel(settings)
    decomposed = kernel == "decomposed"
    if settings.options.accuracy_level not in ACCURACY_LEVELS:
        raise UsageError(f"option accuracy_level: expected one of {', '.join(map(str, ACCURACY_LEVELS))}, "
                         f"got {settings.options.accuracy_level}")
    blocks = _block_options(settings, kernel, nf4)
    embedding_block = _embedding_block(settings, decomposed)
    if decomposed:
        lowering = [DequantizeCodeBookWeightsPass()] if nf4 else []
    else:
        # custom: blocks BlockQuantMatMul does not take (NF4's shrunk to divide K) to MatMulBnb4
        code_book = [*([LowerCodeBookMatMulPass()] if kernel == "custom" else []), LowerMatMulBnb4Pass()]
        lowering = [*([LowerGatherBlockQuantizedPass()] if embedding_block else []),
                    *(code_book if nf4 else []),
                    LowerMatMulNBitsPass(MatMulNBitsOptions(settings.options.accuracy_level, kernel == "custom"))]
    # block-wise DequantizeLinear: the decomposed lowering's, and that of NF4's 8-bit scales
    block_dequantize = decomposed or blocks.scale_block is not None
    return [
        *canonicalize(BLOCK_DEQUANTIZE_OPSET if block_dequantize else PER_CHANNEL_OPSET),
        *untie(settings),
        *scale,
        AssignBlockSpecsPass(blocks),
        *fit,
        *assign_embedding_specs(settings, embedding_block, blocks.symmetric),
        *lowering,
        QuantizeWeightsPass(),  # the embedding tables', and behind DequantizeLinear the 4-bit blocks
        *gather_rows(settings),
        EliminateDeadCodePass(),
    ]


def _w4a16_rtn(settings: Settings) -> list[ir.passes.PassBase]:
    return _w4a16(settings)


def _w4a16_hqq(settings: Settings) -> list[ir.passes.PassBase]:
    if settings.options.symmetric:
        raise UsageError("recipe w4a16-hqq fits each block's zero point, which symmetric blocks do not have: use "
                         "symmetric=false, or w4a16-rtn")
    integer_zero_points = _kernel(settings) in ("custom", "decomposed")  # MatMulNBits alone takes float ones
    return _w4a16(settings, fit=[FitBlockGridsHQQPass(HQQOptions(integer_zero_points=integer_zero_points))])


def _w4a16_gptq(settings: Settings) -> list[ir.passes.PassBase]:
    data = settings.require_calib("w4a16-gptq", without_data="w4a16-rtn or w4a16-hqq")
    options = settings.options
    if not 0 < options.damp < 1:
        raise UsageError(f"option damp: expected a fraction in (0, 1), got {options.damp}")
    if options.stages < 1:
        raise UsageError(f"option stages: expected 1 or more, got {options.stages}")
    negative_scales = _kernel(settings) != "decomposed"
    return _w4a16(settings, fit=[RoundBlocksGPTQPass(GPTQOptions(data, options.damp, options.act_order, options.stages,
                                                                 negative_scales))])


def _w4a16_awq(settings: Settings) -> list[ir.passes.PassBase]:
    data = settings.require_calib("w4a16-awq", without_data="w4a16-rtn or w4a16-hqq")
    blocks = _block_options(settings, _kernel(settings) == "decomposed")
    awq = AWQOptions(data, blocks.block_size, blocks.symmetric, not blocks.block_dequantize, blocks.head_bits,
                     settings.excluded)
    return _w4a16(settings, scale=[ChooseAWQScalesPass(awq), SmoothActivationsPass()])


def _nf4(settings: Settings) -> list[ir.passes.PassBase]:
    return _w4a16(settings, nf4=True)


RECIPES = [
    Recipe("w4a16-rtn", "INT4 block-wise weight-only, round to nearest: MatMul / Gemm weights in blocks along K, "
                        "lowered to MatMulNBits (ONNX Runtime) or block-wise DequantizeLinear (opset 21)",
           W4A16Options, _w4a16_rtn),
    Recipe("w4a16-hqq", "INT4 block-wise weight-only, HQQ: as w4a16-rtn, asymmetric, each block's zero point "
                        "fitted to its weights by half-quadratic optimization; no calibration data",
           W4A16HQQOptions, _w4a16_hqq),
    Recipe("w4a16-gptq", "INT4 block-wise weight-only, GPTQ: as w4a16-rtn, each weight rounded column by column "
                         "with the error fed forward by the Hessian of its layer's input on calibration data",
           W4A16GPTQOptions, _w4a16_gptq),
    Recipe("w4a16-awq", "INT4 block-wise weight-only, AWQ: as w4a16-rtn, after per-input-channel scales searched "
                        "on calibration data move precision to the weights of the most active inputs (folded into "
                        "the op before where exact, else a Mul)",
           W4A16Options, _w4a16_awq),
    Recipe("nf4", "NF4 block-wise weight-only (QLoRA's code book), absmax per block stored in 8 bits (double "
                  "quantization): MatMulBnb4 (ONNX Runtime) or the indexes decoded by standard ops",
           NF4Options, _nf4),
]
