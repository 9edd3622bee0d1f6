"""Definitions of qcompile's custom operators (domain ``ai.qcompile``): semantics, numpy references, one-node
models and their standard-ONNX equivalents. The C++ kernels in `custom_kernels/` are tested against them.

* `block_quant_matmul`: ``BlockQuantMatMul``, INT4 / INT8 block-wise weights times int8-quantized activations.
* `onnx_graphs`: what their models share (the model around the nodes, the activations' INT8 round trip).
* `outlier_split_matmul`: ``OutlierSplitMatMul``, LLM.int8(): INT8 weights, the activations' outlier columns in float.
"""
