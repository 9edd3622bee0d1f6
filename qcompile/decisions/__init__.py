"""Decisions in one home: the metadata keys passes exchange, `QuantSpec` (a grid times a granularity),
shared and derived specs, and the records of analyses that rescale or correct the model."""
from qcompile.decisions.grids import NF4, CodebookGrid, FloatGrid, Grid, IntegerGrid
from qcompile.decisions.keys import *  # noqa: F403
from qcompile.decisions.records import (BiasCorrection, Equalization, Smoothing, channel_scale_json,
                                        read_channel_scale)
from qcompile.decisions.spec import (INTEGER_KERNEL_DTYPES, DerivedSpec, Granularity, LevelConstraint, PerAxis,
                                     PerBlock, PerTensor, QuantSpec, SharedSpec, activation_spec, grid_range,
                                     grid_within, symmetric_weight_spec)
