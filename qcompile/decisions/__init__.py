"""Decisions in one home: the metadata keys passes exchange, `QuantSpec` (a grid times a granularity),
shared and derived specs, and the records of analyses that rescale or correct the model."""
from qcompile.decisions.grids import NF4, CodebookGrid, FloatGrid, Grid, IntegerGrid
from qcompile.decisions.keys import (BIAS_CORRECTION_KEY, CHANGED_BY, CHANNEL_SCALE_KEY, CODE_BOOK_KEY, CREATED_BY, EQUALIZATION_KEY,
                                     FLOAT16_STORAGE_KEY, FLOAT_ISLANDS_KEY, FLOAT_REASON_KEY, INT8_STORAGE_KEY, MEAN_KEY, NEEDS_RANGE_KEY, NOTES_KEY, OUTLIER_COLUMNS_KEY, QUANT_SPEC_KEY, QUANTIZED_INPUTS_KEY,
                                     SHARED_SPEC_KEY, SMOOTHING_KEY)
from qcompile.decisions.records import (BiasCorrection, Equalization, Smoothing, channel_scale_json,
                                        read_channel_scale, take_decisions)
from qcompile.decisions.spec import (FLOAT8_TYPES, INTEGER_KERNEL_DTYPES, MAX_BIAS_LEVEL, DerivedSpec, Granularity, LevelConstraint, PerAxis,
                                     PerBlock, PerTensor, QuantSpec, SharedSpec, activation_spec, grid_range,
                                     grid_within, float8_weight_spec, symmetric_weight_spec)

__all__ = [
    "NF4", "CodebookGrid", "FloatGrid", "Grid", "IntegerGrid",
    "BIAS_CORRECTION_KEY", "CHANGED_BY", "CODE_BOOK_KEY", "FLOAT16_STORAGE_KEY", "FLOAT_ISLANDS_KEY", "FLOAT_REASON_KEY", "INT8_STORAGE_KEY", "CHANNEL_SCALE_KEY", "CREATED_BY", "EQUALIZATION_KEY", "MEAN_KEY",
    "NEEDS_RANGE_KEY", "NOTES_KEY", "OUTLIER_COLUMNS_KEY", "QUANT_SPEC_KEY", "QUANTIZED_INPUTS_KEY", "SHARED_SPEC_KEY", "SMOOTHING_KEY",
    "BiasCorrection", "Equalization", "Smoothing", "channel_scale_json", "read_channel_scale", "take_decisions",
    "FLOAT8_TYPES", "INTEGER_KERNEL_DTYPES", "MAX_BIAS_LEVEL", "DerivedSpec", "Granularity", "LevelConstraint", "PerAxis", "PerBlock", "PerTensor",
    "QuantSpec", "SharedSpec", "activation_spec", "grid_range", "grid_within", "float8_weight_spec", "symmetric_weight_spec",
]
