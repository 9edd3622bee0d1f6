// Each operator of the library as a plain description; library.cc turns it into ONNX Runtime's OrtCustomOp.
#pragma once

#include <vector>

#include "onnxruntime_c_api.h"

namespace qcompile {

struct CustomOp {
  const char* name = nullptr;
  std::vector<ONNXTensorElementDataType> inputs, outputs;
  size_t optional_inputs = 0;  // the last inputs that may be left out
  OrtStatus* (*create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**) = nullptr;
  OrtStatus* (*compute)(void*, OrtKernelContext*) = nullptr;
  void (*destroy)(void*) = nullptr;
};

// `activations`: the type of A and Y (float32 or float16: one registration each, under the op's one name).
CustomOp block_quant_matmul_op(ONNXTensorElementDataType activations);
CustomOp outlier_split_matmul_op(ONNXTensorElementDataType activations);

}  // namespace qcompile
