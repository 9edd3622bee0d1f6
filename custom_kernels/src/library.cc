// The library's entry point: ONNX Runtime calls RegisterCustomOps when a session registers the library.
//
// Built with one release's headers, it runs on every ONNX Runtime from kOldestMinor on: it asks for the API
// version the running library serves (at most the headers'), states that version in each OrtCustomOp (ONNX
// Runtime rejects versions newer than its own), and calls no function newer than kOldestMinor (ort_api.h).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "ops.h"
#include "ort_api.h"

namespace qcompile {

const OrtApi* g_api = nullptr;

namespace {

constexpr int kOldestMinor = 20;  // README's oldest supported ONNX Runtime (1.20); KernelComputeV2 needs 16+
const char* kDomain = "ai.qcompile";

// An OrtCustomOp that carries its description; ONNX Runtime calls back with the OrtCustomOp pointer.
struct RegisteredOp : OrtCustomOp {
  CustomOp op;
};

const CustomOp& described(const OrtCustomOp* op) { return static_cast<const RegisteredOp*>(op)->op; }

// A node's kernel: its op's state, and the op that computes with it.
struct Kernel {
  const CustomOp* op;
  void* state;
};

// What a kernel throws (out of memory) comes back as a status: exceptions must not cross into C.
template <typename F>
OrtStatus* guarded(F&& body) {
  try {
    return body();
  } catch (const std::exception& error) {
    return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, error.what());
  }
}

RegisteredOp* registered(CustomOp op, uint32_t version) {
  auto* result = new RegisteredOp{};  // lives as long as the process: sessions may outlive any other owner
  result->op = std::move(op);
  result->version = version;
  result->GetName = [](const OrtCustomOp* self) { return described(self).name; };
  result->GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  result->GetInputType = [](const OrtCustomOp* self, size_t i) { return described(self).inputs[i]; };
  result->GetInputTypeCount = [](const OrtCustomOp* self) { return described(self).inputs.size(); };
  result->GetOutputType = [](const OrtCustomOp* self, size_t i) { return described(self).outputs[i]; };
  result->GetOutputTypeCount = [](const OrtCustomOp* self) { return described(self).outputs.size(); };
  result->GetInputCharacteristic = [](const OrtCustomOp* self, size_t i) {
    const CustomOp& op = described(self);
    return i + op.optional_inputs >= op.inputs.size() ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  result->GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  result->GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  result->GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  result->GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  result->GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  result->GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  result->CreateKernelV2 = [](const OrtCustomOp* self, const OrtApi* api, const OrtKernelInfo* info, void** out) {
    return guarded([&] {
      const CustomOp& op = described(self);
      void* state = nullptr;
      OrtStatus* status = op.create(self, api, info, &state);
      if (status == nullptr) *out = new Kernel{&op, state};
      return status;
    });
  };
  result->KernelComputeV2 = [](void* kernel, OrtKernelContext* context) {
    return guarded([&] {
      const auto* k = static_cast<const Kernel*>(kernel);
      return k->op->compute(k->state, context);
    });
  };
  result->KernelDestroy = [](void* kernel) {
    auto* k = static_cast<Kernel*>(kernel);
    k->op->destroy(k->state);
    delete k;
  };
  return result;
}

int runtime_minor(const OrtApiBase* base) {
  const char* version = base->GetVersionString();  // "1.20.1"
  const char* dot = version ? std::strchr(version, '.') : nullptr;
  return dot ? std::atoi(dot + 1) : 0;
}

}  // namespace
}  // namespace qcompile

extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  using namespace qcompile;
  const int minor = runtime_minor(base);
  const uint32_t version = static_cast<uint32_t>(std::min(minor, ORT_API_VERSION));
  const OrtApi* api = base->GetApi(version);
  if (api == nullptr) return nullptr;  // nothing to report an error with: ONNX Runtime sees no ops
  if (minor < kOldestMinor) {
    const std::string message = "qcompile's custom-op library needs ONNX Runtime 1." +
                                std::to_string(kOldestMinor) + " or newer, this is " + base->GetVersionString();
    return api->CreateStatus(ORT_FAIL, message.c_str());
  }
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;  // kept for the process's life, like the ops
  QCOMPILE_RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &domain));
  constexpr ONNXTensorElementDataType kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  constexpr ONNXTensorElementDataType kHalf = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  static RegisteredOp* const ops[] = {registered(block_quant_matmul_op(kFloat), version),
                                      registered(block_quant_matmul_op(kHalf), version),
                                      registered(outlier_split_matmul_op(kFloat), version),
                                      registered(outlier_split_matmul_op(kHalf), version)};
  for (RegisteredOp* op : ops) QCOMPILE_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, op));
  return api->AddCustomOpDomain(options, domain);
}
