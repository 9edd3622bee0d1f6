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

OrtStatus* attribute(const OrtKernelInfo* info, const char* name, int64_t& value) {
  if (OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, &value)) {
    g_api->ReleaseStatus(status);
    return fail(std::string("BlockQuantMatMul: attribute ") + name + " is missing");
  }
  return nullptr;
}

OrtStatus* create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  Kernel kernel;
  QCOMPILE_RETURN_IF_ERROR(attribute(info, "K", kernel.k));
  QCOMPILE_RETURN_IF_ERROR(attribute(info, "N", kernel.n));
  QCOMPILE_RETURN_IF_ERROR(attribute(info, "bits", kernel.bits));
  QCOMPILE_RETURN_IF_ERROR(attribute(info, "block_size", kernel.block));
  if (kernel.k < 1 || kernel.n < 1) return fail("BlockQuantMatMul: K and N must be positive");
  if (kernel.bits != 4 && kernel.bits != 8) {
    return fail("BlockQuantMatMul: bits must be 4 or 8, got " + std::to_string(kernel.bits));
  }
  if (kernel.block != 32 && kernel.block != 64 && kernel.block != 128 && kernel.block != 256) {
    return fail("BlockQuantMatMul: block_size must be 32, 64, 128 or 256, got " + std::to_string(kernel.block));
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

OrtStatus* expect(const OrtValue* value, const char* name, ONNXTensorElementDataType type, const char* type_name,
                  int64_t size, TensorInfo& info) {
  QCOMPILE_RETURN_IF_ERROR(tensor_info(value, info));
  if (info.type != type) return fail(std::string("BlockQuantMatMul: ") + name + " must be " + type_name);
  if (size >= 0 && info.size() != size) {
    return fail(std::string("BlockQuantMatMul: ") + name + " has " + std::to_string(info.size()) +
                " elements, expected " + std::to_string(size));
  }
  return nullptr;
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(state);
  const int64_t k_blocks = (kernel.k + kernel.block - 1) / kernel.block;
  size_t inputs = 0;
  QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &inputs));
  const OrtValue* values[4] = {};
  for (size_t i = 0; i < inputs && i < 4; ++i) {
    QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &values[i]));
  }
  TensorInfo a, b, scales, zero_points;
  QCOMPILE_RETURN_IF_ERROR(expect(values[0], "A", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32", -1, a));
  if (a.shape.empty() || a.shape.back() != kernel.k) {
    return fail("BlockQuantMatMul: A has shape " + shape_text(a.shape) + ", its last dimension must be K = " +
                std::to_string(kernel.k));
  }
  QCOMPILE_RETURN_IF_ERROR(expect(values[1], "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8",
                                  kernel.n * k_blocks * kernel.block * kernel.bits / 8, b));
  QCOMPILE_RETURN_IF_ERROR(expect(values[2], "scales", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32",
                                  kernel.n * k_blocks, scales));
  BlockWeight weight{kernel.k, kernel.n, k_blocks, static_cast<int>(kernel.bits), static_cast<int>(kernel.block),
                     nullptr, nullptr, nullptr};
  if (values[3] != nullptr) {
    QCOMPILE_RETURN_IF_ERROR(expect(values[3], "zero_points", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                                    "uint8 (float zero points have no integer kernel)",
                                    kernel.n * ((k_blocks * kernel.bits + 7) / 8), zero_points));
    QCOMPILE_RETURN_IF_ERROR(tensor_data(values[3], &weight.zero_points));
  }
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[1], &weight.data));
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[2], &weight.scales));
  const float* x = nullptr;
  QCOMPILE_RETURN_IF_ERROR(tensor_data(values[0], &x));

  std::vector<int64_t> shape = a.shape;
  shape.back() = kernel.n;
  OrtValue* output = nullptr;
  QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &output));
  const int64_t m = a.size() / kernel.k;
  if (m == 0) return nullptr;
  void* y = nullptr;
  QCOMPILE_RETURN_IF_ERROR(g_api->GetTensorMutableData(output, &y));

  thread_local QuantizedRows rows;
  prepare_rows(m, weight, rows);
  Job job{&kernel, &weight, x, &rows, static_cast<float*>(y)};
  QCOMPILE_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(context, quantize, static_cast<size_t>(m), 0, &job));
  const size_t tasks = static_cast<size_t>((kernel.n + kColumnsPerTask - 1) / kColumnsPerTask);
  return g_api->KernelContext_ParallelFor(context, run_columns, tasks, 0, &job);
}

}  // namespace

CustomOp block_quant_matmul_op() {
  CustomOp op;
  op.name = "BlockQuantMatMul";
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
