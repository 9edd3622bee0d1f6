// ai.qcompile.OutlierSplitMatMul (LLM.int8()): Y (..., N) = A (..., K) times an INT8 weight (N, K) stored + 128,
// the outlier columns of A (given, or detected: max |A[.., k]| > threshold) in float with their dequantized weight
// rows, the rest quantized to int8 per row and multiplied on integer instructions (ops/outlier_split_matmul.py).
// Attributes K, N, threshold (default 6.0); inputs A (float32 or float16, as Y), B (uint8), scales (float),
// outlier_columns (int64, optional).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "activations.h"
#include "block_gemm.h"
#include "ops.h"
#include "ort_api.h"

namespace qcompile {

namespace {

constexpr const char* kOp = "OutlierSplitMatMul";
constexpr int64_t kChunk = 32;  // bytes `ByteDots` takes at a time
constexpr int64_t kMaxK = INT32_MAX / (255 * 127);

struct Kernel {
  int64_t k = 0, n = 0;
  float threshold = 6.0f;
  Kernels kernels{};
};

OrtStatus* create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  Kernel kernel;
  QCOMPILE_RETURN_IF_ERROR(int_attribute(info, kOp, "K", kernel.k));
  QCOMPILE_RETURN_IF_ERROR(int_attribute(info, kOp, "N", kernel.n));
  if (OrtStatus* status = g_api->KernelInfoGetAttribute_float(info, "threshold", &kernel.threshold)) {
    g_api->ReleaseStatus(status);  // not given: the default
  }
  if (kernel.k < 1 || kernel.n < 1) return fail(std::string(kOp) + ": K and N must be positive");
  if (kernel.k > kMaxK) {  // a row's integer sum, up to 255 x 127 x K, must fit 32 bits
    return fail(std::string(kOp) + ": K must be at most " + std::to_string(kMaxK) + ", got " +
                std::to_string(kernel.k));
  }
  if (!(kernel.threshold > 0.0f)) return fail(std::string(kOp) + ": threshold must be positive");
  kernel.kernels = best_kernels();
  *out = new Kernel(kernel);
  return nullptr;
}

// A's rows without their outlier columns, quantized per row: levels (m, padded_k), scale and level sum per row;
// and the outlier columns themselves, gathered (m, outliers).
struct Rows {
  int64_t padded_k = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  std::vector<float> outliers;
};

struct Job {
  const Kernel* kernel;
  const float* a;
  const uint8_t* b;
  const float* scales;
  const std::vector<int64_t>* outliers;
  Rows* rows;
  int64_t m;
  float* y;
};

void quantize(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t k = job.kernel->k, row = static_cast<int64_t>(index);
  const float* x = job.a + row * k;
  Rows& rows = *job.rows;
  thread_local std::vector<float> rest;  // the row without its outliers, zero-padded (zeros change no level)
  rest.assign(static_cast<size_t>(rows.padded_k), 0.0f);
  std::copy(x, x + k, rest.begin());
  for (int64_t column : *job.outliers) rest[column] = 0.0f;
  float scale;
  int32_t sum;
  const bool finite = job.kernel->kernels.quantize_levels(rest.data(), rows.padded_k,
                                                          rows.q.data() + row * rows.padded_k, scale, sum);
  rows.scale[row] = finite ? scale : NAN;
  rows.sum[row] = sum;
  const std::vector<int64_t>& outliers = *job.outliers;
  for (size_t c = 0; c < outliers.size(); ++c) rows.outliers[row * outliers.size() + c] = x[outliers[c]];
}

void run_columns(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t k = job.kernel->k, n_total = job.kernel->n, whole = k / kChunk * kChunk;
  const Rows& rows = *job.rows;
  const std::vector<int64_t>& outliers = *job.outliers;
  const size_t count = outliers.size();
  const int64_t n0 = static_cast<int64_t>(index) * kColumnsPerTask, n1 = std::min(n0 + kColumnsPerTask, n_total);
  const int64_t columns = n1 - n0;
  thread_local std::vector<float> weights;  // (count, columns): the outlier features' weights, dequantized
  weights.resize(count * static_cast<size_t>(columns));
  for (int64_t j = 0; j < columns; ++j) {
    const uint8_t* w = job.b + (n0 + j) * k;
    for (size_t c = 0; c < count; ++c) {
      weights[c * columns + j] = static_cast<float>(int32_t{w[outliers[c]]} - 128) * job.scales[n0 + j];
    }
  }
  thread_local std::vector<int32_t> dots;  // (m, columns): the integer sums over the row's whole chunks
  dots.resize(static_cast<size_t>(job.m * columns));
  job.kernel->kernels.byte_dots(job.b + n0 * k, k, columns, rows.q.data(), rows.padded_k, job.m, whole, dots.data(),
                                columns);
  if (whole < k) {  // the last bytes of each row
    for (int64_t m = 0; m < job.m; ++m) {
      const int8_t* q = rows.q.data() + m * rows.padded_k;
      for (int64_t j = 0; j < columns; ++j) {
        const uint8_t* w = job.b + (n0 + j) * k;
        for (int64_t i = whole; i < k; ++i) dots[m * columns + j] += int32_t{w[i]} * q[i];
      }
    }
  }
  // Loops over the task's columns alone, on plain pointers: the compiler vectorizes them.
  const float* outlier_weights = weights.data();
  const float* column_scales = job.scales + n0;
  for (int64_t m = 0; m < job.m; ++m) {
    const int32_t* row_dots = dots.data() + m * columns;
    const int32_t zero_point_term = 128 * rows.sum[m];
    const float row_scale = rows.scale[m];
    float* y = job.y + m * n_total + n0;
    for (int64_t j = 0; j < columns; ++j) {
      y[j] = static_cast<float>(row_dots[j] - zero_point_term) * (row_scale * column_scales[j]);
    }
    for (size_t c = 0; c < count; ++c) {  // the outliers in float, added in the reference's order
      const float x = rows.outliers[m * count + c];
      const float* weight = outlier_weights + c * columns;
      for (int64_t j = 0; j < columns; ++j) y[j] += x * weight[j];
    }
  }
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(state);
  const OrtValue* values[4];
  QCOMPILE_RETURN_IF_ERROR(node_inputs(context, values, 4));
  TensorInfo a, b, scales, columns;
  QCOMPILE_RETURN_IF_ERROR(expect_activations(values[0], kOp, kernel.k, a));
  QCOMPILE_RETURN_IF_ERROR(expect(values[1], kOp, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8",
                                  kernel.n * kernel.k, b));
  QCOMPILE_RETURN_IF_ERROR(expect(values[2], kOp, "scales", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32",
                                  kernel.n, scales));
  thread_local FloatActivations io;
  QCOMPILE_RETURN_IF_ERROR(io.bind(context, values[0], a, kernel.n, kernel.kernels));
  Job job{&kernel, io.a(), nullptr, nullptr, nullptr, nullptr, a.size() / kernel.k, io.y()};
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[1], &job.b));
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[2], &job.scales));
  if (job.m == 0) return nullptr;

  std::vector<int64_t> outliers;
  if (values[3] != nullptr) {  // fixed at calibration
    QCOMPILE_RETURN_IF_ERROR(expect(values[3], kOp, "outlier_columns", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
                                    "int64", -1, columns));
    const int64_t* given = nullptr;
    QCOMPILE_RETURN_IF_ERROR(tensor_data(values[3], &given));
    outliers.assign(given, given + columns.size());
  } else {  // the columns whose largest magnitude over the rows passes the threshold
    std::vector<float> largest(static_cast<size_t>(kernel.k), 0.0f);
    for (int64_t m = 0; m < job.m; ++m) {
      const float* x = job.a + m * kernel.k;
      for (int64_t i = 0; i < kernel.k; ++i) largest[i] = std::max(largest[i], std::fabs(x[i]));
    }
    for (int64_t i = 0; i < kernel.k; ++i) {
      if (largest[i] > kernel.threshold) outliers.push_back(i);
    }
  }
  std::sort(outliers.begin(), outliers.end());
  outliers.erase(std::unique(outliers.begin(), outliers.end()), outliers.end());
  if (!outliers.empty() && (outliers.front() < 0 || outliers.back() >= kernel.k)) {
    return fail(std::string(kOp) + ": outlier_columns must lie in [0, K = " + std::to_string(kernel.k) + ")");
  }
  job.outliers = &outliers;

  thread_local Rows rows;
  rows.padded_k = (kernel.k + kChunk - 1) / kChunk * kChunk;
  rows.q.assign(static_cast<size_t>(job.m * rows.padded_k), 0);
  rows.scale.assign(static_cast<size_t>(job.m), 0.0f);
  rows.sum.assign(static_cast<size_t>(job.m), 0);
  rows.outliers.resize(static_cast<size_t>(job.m) * outliers.size());
  job.rows = &rows;
  QCOMPILE_RETURN_IF_ERROR(rows_then_columns(context, job.m, kernel.n, kernel.k, quantize, run_columns, &job));
  io.finish();
  return nullptr;
}

}  // namespace

CustomOp outlier_split_matmul_op(ONNXTensorElementDataType activations) {
  CustomOp op;
  op.name = kOp;
  op.inputs = {activations, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64};
  op.optional_inputs = 1;
  op.outputs = {activations};
  op.create = create;
  op.compute = compute;
  op.destroy = [](void* state) { delete static_cast<Kernel*>(state); };
  return op;
}

}  // namespace qcompile
