// The ONNX Runtime C API as this library uses it: only functions of OrtApi version 17 or older, so that a
// library built with newer headers loads into every runtime from the oldest supported (library.cc).
#pragma once

#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace qcompile {

extern const OrtApi* g_api;  // set by RegisterCustomOps

// An error ONNX Runtime reports for the node (the caller returns it).
inline OrtStatus* fail(const std::string& message) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
}

#define QCOMPILE_RETURN_IF_ERROR(expr)      \
  do {                                      \
    if (OrtStatus* status_ = (expr)) return status_; \
  } while (0)

struct TensorInfo {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

inline OrtStatus* tensor_info(const OrtValue* value, TensorInfo& info) {
  OrtTensorTypeAndShapeInfo* shape_info = nullptr;
  QCOMPILE_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &shape_info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetTensorElementType(shape_info, &info.type);
  if (!status) status = g_api->GetDimensionsCount(shape_info, &rank);
  if (!status) {
    info.shape.resize(rank);
    status = g_api->GetDimensions(shape_info, info.shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(shape_info);
  return status;
}

template <typename T>
inline OrtStatus* tensor_data(const OrtValue* value, const T** data) {
  void* raw = nullptr;  // GetTensorMutableData: GetTensorData is newer than the oldest runtime supported
  QCOMPILE_RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &raw));
  *data = static_cast<const T*>(raw);
  return nullptr;
}

inline std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + ")";
}

// Attribute `name` of node kind `op`, an error if missing.
inline OrtStatus* int_attribute(const OrtKernelInfo* info, const char* op, const char* name, int64_t& value) {
  if (OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, &value)) {
    g_api->ReleaseStatus(status);
    return fail(std::string(op) + ": attribute " + name + " is missing");
  }
  return nullptr;
}

// The node's inputs (up to `count`; an optional one left out is null).
inline OrtStatus* node_inputs(OrtKernelContext* context, const OrtValue** values, size_t count) {
  size_t given = 0;
  QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &given));
  for (size_t i = 0; i < count; ++i) values[i] = nullptr;
  for (size_t i = 0; i < given && i < count; ++i) {
    QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &values[i]));
  }
  return nullptr;
}

// Input `name` of node kind `op`: its type must be `type`, and its element count `size` (any where negative).
inline OrtStatus* expect(const OrtValue* value, const char* op, const char* name, ONNXTensorElementDataType type,
                         const char* type_name, int64_t size, TensorInfo& info) {
  QCOMPILE_RETURN_IF_ERROR(tensor_info(value, info));
  const std::string what = std::string(op) + ": " + name;
  if (info.type != type) return fail(what + " must be " + type_name);
  if (size >= 0 && info.size() != size) {
    return fail(what + " has " + std::to_string(info.size()) + " elements, expected " + std::to_string(size));
  }
  return nullptr;
}

// Input A of node kind `op`: float32 or float16, its last dimension k.
inline OrtStatus* expect_activations(const OrtValue* value, const char* op, int64_t k, TensorInfo& info) {
  QCOMPILE_RETURN_IF_ERROR(tensor_info(value, info));
  if (info.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && info.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    return fail(std::string(op) + ": A must be float32 or float16");
  }
  if (info.shape.empty() || info.shape.back() != k) {
    return fail(std::string(op) + ": A has shape " + shape_text(info.shape) + ", its last dimension must be K = " +
                std::to_string(k));
  }
  return nullptr;
}

// fn(data, i) for every i < total: on ONNX Runtime's threads, or on the calling thread alone where `work` (the
// call's multiply-adds) is too little to pay for waking them (SmolLM2's q/o and k/v projections at one row: 0.33
// and 0.11 M run faster so; gate/up, 0.88 M, slower).
inline OrtStatus* parallel_for(OrtKernelContext* context, void (*fn)(void*, size_t), size_t total, int64_t work,
                               void* data) {
  constexpr int64_t kThreadedWork = int64_t{1} << 19;
  if (work >= kThreadedWork) return g_api->KernelContext_ParallelFor(context, fn, total, 0, data);
  for (size_t i = 0; i < total; ++i) fn(data, i);
  return nullptr;
}

// Output columns per task of an op's column phase.
constexpr int64_t kColumnsPerTask = 16;

// The two phases of both ops' matmul, each on the threads (`parallel_for`): A's m rows quantized
// (`rows(job, row)`), then the n output columns, kColumnsPerTask per task (`columns(job, task)`).
inline OrtStatus* rows_then_columns(OrtKernelContext* context, int64_t m, int64_t n, int64_t k,
                                    void (*rows)(void*, size_t), void (*columns)(void*, size_t), void* job) {
  const int64_t work = m * n * k;
  QCOMPILE_RETURN_IF_ERROR(parallel_for(context, rows, static_cast<size_t>(m), work, job));
  return parallel_for(context, columns, static_cast<size_t>((n + kColumnsPerTask - 1) / kColumnsPerTask), work, job);
}

// The output Y: A's shape with its last dimension N (and A's element type).
inline OrtStatus* output_like(OrtKernelContext* context, const TensorInfo& a, int64_t n, void** y) {
  std::vector<int64_t> shape = a.shape;
  shape.back() = n;
  OrtValue* output = nullptr;
  QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &output));
  return g_api->GetTensorMutableData(output, y);
}

}  // namespace qcompile
