// ai.qcompile.BlockQuantMatMul: Y (..., N) = A (..., K) times a block-quantized weight stored as MatMulNBits
// stores it, with A quantized to int8 per block (block_gemm.h). Attributes K, N, bits (4 or 8), block_size
// (32, 64, 128 or 256); inputs A (float), B (uint8), scales (float), zero_points (uint8, optional).
#include <algorithm>
#include <string>

#include "block_gemm.h"
#include "ops.h"
#include "ort_api.h"

namespace qcompile {

namespace {

struct Kernel {
  int64_t k = 0, n = 0, bits = 0, block = 0;
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
  kernel.kernels = best_kernels();
  *out = new Kernel(kernel);
  return nullptr;
}

constexpr int64_t kColumnsPerTask = 16;

struct Job {
  const Kernel* kernel;
  const BlockWeight* weight;
  const float* a;
  QuantizedRows* rows;
  float* y;
};

void quantize(void* data, size_t row) {
  const Job& job = *static_cast<const Job*>(data);
  job.kernel->kernels.quantize_row(job.a, static_cast<int64_t>(row), *job.weight, *job.rows);
}

void run_columns(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t n0 = static_cast<int64_t>(index) * kColumnsPerTask;
  job.kernel->kernels.columns(*job.weight, *job.rows, n0, std::min(n0 + kColumnsPerTask, job.weight->n), job.y,
                      job.weight->n);
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(state);
  const int64_t k_blocks = (kernel.k + kernel.block - 1) / kernel.block;
  const OrtValue* values[4];
  QCOMPILE_RETURN_IF_ERROR(node_inputs(context, values, 4));
  TensorInfo a, b, scales, zero_points;
  QCOMPILE_RETURN_IF_ERROR(expect_activations(values[0], kOp, kernel.k, a));
  QCOMPILE_RETURN_IF_ERROR(expect(values[1], kOp, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8",
                                  kernel.n * k_blocks * kernel.block * kernel.bits / 8, b));
  QCOMPILE_RETURN_IF_ERROR(expect(values[2], kOp, "scales", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32",
                                  kernel.n * k_blocks, scales));
  BlockWeight weight{kernel.k, kernel.n, k_blocks, static_cast<int>(kernel.bits), static_cast<int>(kernel.block),
                     nullptr, nullptr, nullptr};
  if (values[3] != nullptr) {
    QCOMPILE_RETURN_IF_ERROR(expect(values[3], kOp, "zero_points", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                                    "uint8 (float zero points have no integer kernel)",
                                    kernel.n * ((k_blocks * kernel.bits + 7) / 8), zero_points));
    QCOMPILE_RETURN_IF_ERROR(tensor_data(values[3], &weight.zero_points));
  }
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[1], &weight.data));
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[2], &weight.scales));
  const float* x = nullptr;
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[0], &x));
  float* y = nullptr;
  QCOMPILE_RETURN_IF_ERROR(output_like(context, a, kernel.n, &y));
  const int64_t m = a.size() / kernel.k;
  if (m == 0) return nullptr;

  thread_local QuantizedRows rows;
  prepare_rows(m, weight, rows);
  Job job{&kernel, &weight, x, &rows, y};
  QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(context, quantize, static_cast<size_t>(m), 0, &job));
  const size_t tasks = static_cast<size_t>((kernel.n + kColumnsPerTask - 1) / kColumnsPerTask);
  return g_api->KernelContext_ParallelFor(context, run_columns, tasks, 0, &job);
}

}  // namespace

CustomOp block_quant_matmul_op() {
  CustomOp op;
  op.name = kOp;
  op.inputs = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
  op.optional_inputs = 1;
  op.outputs = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  op.create = create;
  op.compute = compute;
  op.destroy = [](void* state) { delete static_cast<Kernel*>(state); };
  return op;
}

}  // namespace qcompile
