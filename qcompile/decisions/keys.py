"""Every metadata key through which passes exchange decisions, in one place.

`value.meta` / `node.meta` / `model.meta` keys live only in memory, for the passes of one compile;
`metadata_props` keys are saved in the ONNX file, for `qcompile diff`, `eval` and `inspect`.
"""

# value.meta: the `QuantSpec` (or `SharedSpec` / `DerivedSpec`) an analysis decided for the tensor.
QUANT_SPEC_KEY = "qcompile.quant_spec"
# node.meta: the input indexes whose activation the node reads quantized.
QUANTIZED_INPUTS_KEY = "qcompile.quantized_inputs"
# node.meta: why a weighted op stays float (the report's `layers` say it).
FLOAT_REASON_KEY = "qcompile.float_reason"
# model.meta: how many Convs `float_islands` would leave float (`select-quantized-ops`, any placement).
FLOAT_ISLANDS_KEY = "qcompile.float_islands"
# value.meta: this activation needs a calibrated range.
NEEDS_RANGE_KEY = "qcompile.needs_range"
# value.meta: a `SharedSpec`: the value takes the spec of its group (Concat inputs, Reshape in and out, ...).
SHARED_SPEC_KEY = "qcompile.shared_spec"
# value.meta: the tensor's mean over axis 0 on the calibration data (float32, the other axes' shape).
MEAN_KEY = "qcompile.calibration_mean"
# value.meta: a `Smoothing` decision (SmoothQuant) for a MatMul input.
SMOOTHING_KEY = "qcompile.smoothing"
# node.meta: an `Equalization` decision for a Conv -> Relu/Clip -> depthwise Conv chain starting at the node.
EQUALIZATION_KEY = "qcompile.equalization"
# node.meta: a `BiasCorrection` decision: the mean output shift to take off the node's bias.
BIAS_CORRECTION_KEY = "qcompile.bias_correction"
# value.meta: a float weight of float layers to store as INT8: the axes that get their own scales
# (`choose-int8-storage` decides, `store-int8-weights` rewrites).
INT8_STORAGE_KEY = "qcompile.int8_storage"
# value.meta: True: a float weight of float layers to store as float16 (`choose-int8-storage` decides,
# `store-float16-weights` rewrites).
FLOAT16_STORAGE_KEY = "qcompile.float16_storage"
# value.meta: the input features (sorted int64 array) of an LLM.int8() layer input that are multiplied in float,
# fixed on calibration data (`choose-outlier-columns` decides, `lower-outlier-split-matmul` stores them).
OUTLIER_COLUMNS_KEY = "qcompile.outlier_columns"
# model.meta: the notes passes leave for the report (`qcompile.notes`).
NOTES_KEY = "qcompile.notes"

# Saved in the file (metadata_props):
# on a tensor the compiler rescaled per channel: JSON {"shape": [...], "factors": [...]}, so that
# comparisons with the original model can undo it.
CHANNEL_SCALE_KEY = "qcompile.channel_scale"
# on the node that decodes a weight stored as code-book indexes (NF4 behind standard ops): the code book's name.
CODE_BOOK_KEY = "qcompile.code_book"
# on each node: the pass that created it, and the passes that changed it (`qcompile.pipeline`).
CREATED_BY = "qcompile.created_by"
CHANGED_BY = "qcompile.changed_by"
