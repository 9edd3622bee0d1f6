"""Raise a model below opset 13 to opset 13, the first where DequantizeLinear has an `axis`.

Older exports (torch's TorchScript exporter at opset 10-12, say) could otherwise hold only per-tensor
weights: on MobileNetV2 that costs 7 dB of output SQNR (13.0 dB at opset 11 against 20.1 dB). Opset 13
is from 2020 and every target runs it (TensorRT needs it for per-channel Q/DQ anyway).
"""
from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

from qcompile.notes import add_note

PER_CHANNEL_OPSET = 13


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Convert a model below ``min_opset`` (13 unless a recipe needs more) to it (onnxscript's version converter,
    falling back to onnx's)."""

    name = "upgrade-opset"

    def __init__(self, min_opset: int = PER_CHANNEL_OPSET):
        super().__init__()
        self.min_opset = min_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.opset_imports.get("")
        if before is None or before >= self.min_opset:
            return ir.passes.PassResult(model, modified=False)
        converter_log = logging.getLogger("onnxscript.version_converter")
        level = converter_log.level
        converter_log.setLevel(logging.ERROR)  # it warns whenever it falls back to onnx's converter
        try:
            ConvertVersionPass(self.min_opset, fallback=True)(model)
        finally:
            converter_log.setLevel(level)
        after = model.opset_imports.get("")
        if after != self.min_opset:  # the converter leaves the model as it was when it fails
            add_note(model, f"opset {before} kept: onnx's version converter could not raise it to {self.min_opset}")
            return ir.passes.PassResult(model, modified=False)
        takes = "per-channel scales" if self.min_opset == PER_CHANNEL_OPSET else "blocks of scales, 4-bit and FP8 types"
        add_note(model, f"opset {before} raised to {self.min_opset}, where DequantizeLinear takes {takes}")
        return ir.passes.PassResult(model, modified=True)
