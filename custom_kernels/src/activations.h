// A node's activations A and output Y as the kernels take them, float32: float16 tensors are converted on the way
// in (all of A, before the kernels run) and out (`finish`, after), through buffers of the calling thread.
#pragma once

#include <cstdint>
#include <vector>

#include "block_gemm.h"
#include "ort_api.h"

namespace qcompile {

class FloatActivations {
 public:
  // A (float32 or float16, checked by expect_activations) and the output Y: A's shape with its last dimension n.
  OrtStatus* bind(OrtKernelContext* context, const OrtValue* a_value, const TensorInfo& a, int64_t n,
                  const Kernels& kernels) {
    kernels_ = &kernels;
    const bool half = a.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    void* y = nullptr;
    QCOMPILE_RETURN_IF_ERROR(output_like(context, a, n, &y));
    y_count_ = a.size() / a.shape.back() * n;
    if (!half) {
      QCOMPILE_RETURN_IF_ERROR(tensor_data(a_value, &a_));
      y_ = static_cast<float*>(y);
      half_y_ = nullptr;
      return nullptr;
    }
    const uint16_t* halves = nullptr;
    QCOMPILE_RETURN_IF_ERROR(tensor_data(a_value, &halves));
    a_buffer_.resize(static_cast<size_t>(a.size()));
    kernels.to_floats(halves, a_buffer_.data(), a.size());
    a_ = a_buffer_.data();
    y_buffer_.resize(static_cast<size_t>(y_count_));
    y_ = y_buffer_.data();
    half_y_ = static_cast<uint16_t*>(y);
    return nullptr;
  }

  const float* a() const { return a_; }
  float* y() const { return y_; }

  // Y written: to float16 where the output is.
  void finish() const {
    if (half_y_ != nullptr) kernels_->to_halves(y_, half_y_, y_count_);
  }

 private:
  const Kernels* kernels_ = nullptr;
  const float* a_ = nullptr;
  float* y_ = nullptr;
  uint16_t* half_y_ = nullptr;
  int64_t y_count_ = 0;
  std::vector<float> a_buffer_, y_buffer_;
};

}  // namespace qcompile
