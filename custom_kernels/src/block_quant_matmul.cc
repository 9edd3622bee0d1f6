// ai.qcompile.BlockQuantMatMul: Y (..., N) = A (..., K) times a block-quantized weight stored as MatMulNBits
// stores it, with A quantized to int8 per block (block_gemm.h). Attributes K, N, bits (4 or 8), block_size
// (32, 64, 128 or 256), scale_block (with 8-bit scales); inputs A (float32 or float16, as Y), B (uint8), then
// optional: scales (float), zero_points (uint8), code_book (int8, 16 levels the 4-bit values index), and in place
// of scales 8-bit ones: scale_levels (uint8), scale_scales (float), scale_zero_points (uint8), one of each last
// two per scale_block columns and block (ops/block_quant_matmul.py).
#include <algorithm>
#include <string>
#include <vector>

#include "activations.h"
#include "block_gemm.h"
#include "ops.h"
#include "ort_api.h"

namespace qcompile {

namespace {

struct Kernel {
  int64_t k = 0, n = 0, bits = 0, block = 0, scale_block = 0;  // scale_block: 0 where the node has none
  Kernels kernels{};
};

constexpr const char* kOp = "BlockQuantMatMul";

OrtStatus* create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  Kernel kernel;
  QCOMPILE_RETURN_IF_ERROR(int_attribute(info, kOp, "K", kernel.k));
  QCOMPILE_RETURN_IF_ERROR(int_attribute(info, kOp, "N", kernel.n));
  QCOMPILE_RETURN_IF_ERROR(int_attribute(info, kOp, "bits", kernel.bits));
  QCOMPILE_RETURN_IF_ERROR(int_attribute(info, kOp, "block_size", kernel.block));
  if (kernel.k < 1 || kernel.n < 1) return fail(std::string(kOp) + ": K and N must be positive");
  if (kernel.bits != 4 && kernel.bits != 8) {
    return fail(std::string(kOp) + ": bits must be 4 or 8, got " + std::to_string(kernel.bits));
  }
  if (kernel.block != 32 && kernel.block != 64 && kernel.block != 128 && kernel.block != 256) {
    return fail(std::string(kOp) + ": block_size must be 32, 64, 128 or 256, got " + std::to_string(kernel.block));
  }
  if (OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, "scale_block", &kernel.scale_block)) {
    g_api->ReleaseStatus(status);
    kernel.scale_block = 0;
  } else if (kernel.scale_block < 1) {
    return fail(std::string(kOp) + ": scale_block must be positive");
  }
  kernel.kernels = best_kernels();
  *out = new Kernel(kernel);
  return nullptr;
}

// Block scales stored in 8 bits: scale[n, b] = (levels[n, b] - zero_points[g, b]) * scales[g, b], g = n / block.
struct ScaleLevels {
  const uint8_t* levels = nullptr;
  const float* scales = nullptr;
  const uint8_t* zero_points = nullptr;
  int64_t block = 0;
};

struct Job {
  const Kernel* kernel;
  const BlockWeight* weight;
  const ScaleLevels* scale_levels;  // null where the scales are floats
  const float* a;
  QuantizedRows* rows;
  float* y;
};

void quantize(void* data, size_t row) {
  const Job& job = *static_cast<const Job*>(data);
  job.kernel->kernels.quantize_row(job.a, static_cast<int64_t>(row), *job.weight, *job.rows);
}

// Columns n0 .. n1 of `w` as a weight of their own, their 8-bit scales decoded into `decoded`.
BlockWeight decoded_columns(const BlockWeight& w, const ScaleLevels& s, int64_t n0, int64_t n1,
                            std::vector<float>& decoded) {
  decoded.resize(static_cast<size_t>((n1 - n0) * w.k_blocks));
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t at = n * w.k_blocks, group = n / s.block * w.k_blocks;
    for (int64_t b = 0; b < w.k_blocks; ++b) {
      decoded[(n - n0) * w.k_blocks + b] =
          static_cast<float>(int32_t{s.levels[at + b]} - s.zero_points[group + b]) * s.scales[group + b];
    }
  }
  BlockWeight part = w;
  part.n = n1 - n0;
  part.data = w.column(n0);
  part.scales = decoded.data();
  if (w.zero_points) part.zero_points = w.zero_points + n0 * ((w.k_blocks * w.bits + 7) / 8);
  return part;
}

void run_columns(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const BlockWeight& w = *job.weight;
  const int64_t n0 = static_cast<int64_t>(index) * kColumnsPerTask, n1 = std::min(n0 + kColumnsPerTask, w.n);
  if (job.scale_levels == nullptr) {
    job.kernel->kernels.columns(w, *job.rows, n0, n1, job.y, w.n);
    return;
  }
  thread_local std::vector<float> decoded;
  const BlockWeight part = decoded_columns(w, *job.scale_levels, n0, n1, decoded);
  job.kernel->kernels.columns(part, *job.rows, 0, n1 - n0, job.y + n0, w.n);
}

constexpr int kInputs = 8;
constexpr int64_t kCodeBookSize = 16;

// The weight's scales: floats (`scales`), or 8-bit levels with their own scales and zero points (`scale_levels`).
OrtStatus* read_scales(const Kernel& kernel, const OrtValue* const* values, int64_t k_blocks, BlockWeight& weight,
                       ScaleLevels& scale_levels, bool& eight_bit) {
  TensorInfo info;
  eight_bit = values[5] != nullptr;
  const bool parts_of_eight_bit = values[6] != nullptr || values[7] != nullptr;
  if ((values[2] != nullptr) == eight_bit || (!eight_bit && parts_of_eight_bit)) {
    return fail(std::string(kOp) + ": give either scales or scale_levels, scale_scales and scale_zero_points");
  }
  if (!eight_bit) {
    QCOMPILE_RETURN_IF_ERROR(expect(values[2], kOp, "scales", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32",
                                    kernel.n * k_blocks, info));
    return tensor_data(values[2], &weight.scales);
  }
  if (values[6] == nullptr || values[7] == nullptr || kernel.scale_block == 0) {
    return fail(std::string(kOp) + ": scale_levels need scale_scales, scale_zero_points and attribute scale_block");
  }
  const int64_t groups = (kernel.n + kernel.scale_block - 1) / kernel.scale_block * k_blocks;
  QCOMPILE_RETURN_IF_ERROR(expect(values[5], kOp, "scale_levels", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8",
                                  kernel.n * k_blocks, info));
  QCOMPILE_RETURN_IF_ERROR(expect(values[6], kOp, "scale_scales", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32",
                                  groups, info));
  QCOMPILE_RETURN_IF_ERROR(expect(values[7], kOp, "scale_zero_points", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8",
                                  groups, info));
  scale_levels.block = kernel.scale_block;
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[5], &scale_levels.levels));
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[6], &scale_levels.scales));
  return tensor_data(values[7], &scale_levels.zero_points);
}

// The code book's int8 levels as the unsigned ones the kernels multiply (+ 128, around the zero point 128).
OrtStatus* read_code_book(const Kernel& kernel, const OrtValue* value, const BlockWeight& weight, uint8_t* book) {
  TensorInfo info;
  QCOMPILE_RETURN_IF_ERROR(expect(value, kOp, "code_book", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, "int8",
                                  kCodeBookSize, info));
  if (kernel.bits != 4) return fail(std::string(kOp) + ": a code_book needs bits = 4");
  if (weight.zero_points != nullptr) return fail(std::string(kOp) + ": a code_book takes no zero_points");
  const int8_t* levels = nullptr;
  QCOMPILE_RETURN_IF_ERROR(tensor_data(value, &levels));
  for (int64_t i = 0; i < kCodeBookSize; ++i) book[i] = static_cast<uint8_t>(levels[i] + 128);
  return nullptr;
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(state);
  const int64_t k_blocks = (kernel.k + kernel.block - 1) / kernel.block;
  const OrtValue* values[kInputs];
  QCOMPILE_RETURN_IF_ERROR(node_inputs(context, values, kInputs));
  TensorInfo a, b, zero_points;
  QCOMPILE_RETURN_IF_ERROR(expect_activations(values[0], kOp, kernel.k, a));
  QCOMPILE_RETURN_IF_ERROR(expect(values[1], kOp, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8",
                                  kernel.n * k_blocks * kernel.block * kernel.bits / 8, b));
  BlockWeight weight{kernel.k, kernel.n, k_blocks, static_cast<int>(kernel.bits), static_cast<int>(kernel.block),
                     nullptr, nullptr, nullptr};
  ScaleLevels scale_levels;
  bool eight_bit_scales = false;
  QCOMPILE_RETURN_IF_ERROR(read_scales(kernel, values, k_blocks, weight, scale_levels, eight_bit_scales));
  if (values[3] != nullptr) {
    QCOMPILE_RETURN_IF_ERROR(expect(values[3], kOp, "zero_points", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                                    "uint8 (float zero points have no integer kernel)",
                                    kernel.n * ((k_blocks * kernel.bits + 7) / 8), zero_points));
    QCOMPILE_RETURN_IF_ERROR(tensor_data(values[3], &weight.zero_points));
  }
  uint8_t code_book[kCodeBookSize];
  if (values[4] != nullptr) {
    QCOMPILE_RETURN_IF_ERROR(read_code_book(kernel, values[4], weight, code_book));
    weight.code_book = code_book;
  }
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[1], &weight.data));
  thread_local FloatActivations io;
  QCOMPILE_RETURN_IF_ERROR(io.bind(context, values[0], a, kernel.n, kernel.kernels));
  const int64_t m = a.size() / kernel.k;
  if (m == 0) return nullptr;

  thread_local QuantizedRows rows;
  prepare_rows(m, weight, rows);
  Job job{&kernel, &weight, eight_bit_scales ? &scale_levels : nullptr, io.a(), &rows, io.y()};
  QCOMPILE_RETURN_IF_ERROR(rows_then_columns(context, m, kernel.n, kernel.k, quantize, run_columns, &job));
  io.finish();
  return nullptr;
}

}  // namespace

CustomOp block_quant_matmul_op(ONNXTensorElementDataType activations) {
  CustomOp op;
  op.name = kOp;
  op.inputs = {activations, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
  op.optional_inputs = kInputs - 2;
  op.outputs = {activations};
  op.create = create;
  op.compute = compute;
  op.destroy = [](void* state) { delete static_cast<Kernel*>(state); };
  return op;
}

}  // namespace qcompile
