"""Calibration: one runner over a model in memory and a data source, pluggable statistics, and the
observers that turn them into ranges for a grid."""
from qcompile.calibration.observers import (CalibrationOptions, Method, TensorRange, calibrate_ranges,
                                            expected_squared_error, kl_threshold_bins)
from qcompile.calibration.runner import CalibrationData, CalibrationRunner, Statistic
from qcompile.calibration.statistics import (ChannelMax, ChannelMeanAbs, ChannelMeanSquare, Gram, HistogramStatistic,
                                             MeanStatistic, RangeStatistic)

__all__ = ["CalibrationOptions", "Method", "TensorRange", "calibrate_ranges", "expected_squared_error",
           "kl_threshold_bins", "CalibrationData", "CalibrationRunner", "Statistic", "ChannelMax", "ChannelMeanAbs", "ChannelMeanSquare",
           "Gram", "HistogramStatistic", "MeanStatistic", "RangeStatistic"]
