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

}  // namespace qcompile
