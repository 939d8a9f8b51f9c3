// Entry point of libocomp_runtime: registers the "ocomp" custom-op domain.
// The only exported symbol (see exports.map). No onnxruntime library is
// linked: the loading runtime passes its OrtApiBase.
#include "onnxruntime_cxx_api.h"  // ORT_API_MANUAL_INIT is set by CMake

#include <string>

#include "ternary_conv.h"
#include "ternary_gemm.h"
#include "w2a8.h"
#include "common.h"

namespace {

const char* const kDomain = "ocomp";

// Static so they outlive every session that uses them.
const ocomp::TernaryConvOp& conv_op() {
  static const ocomp::TernaryConvOp op;
  return op;
}
const ocomp::TernaryGemmOp& gemm_op() {
  static const ocomp::TernaryGemmOp op;
  return op;
}
const ocomp::TernaryMatMulOp& matmul_op() {
  static const ocomp::TernaryMatMulOp op;
  return op;
}

// Any API version the runtime supports, only to build an error status.
const OrtApi* any_api(const OrtApiBase* base) {
  for (uint32_t v = ORT_API_VERSION; v >= 1; --v)
    if (const OrtApi* api = base->GetApi(v)) return api;
  return nullptr;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // nothing to report through
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* fallback = any_api(api_base);
    const std::string msg = std::string("libocomp_runtime was built against onnxruntime API version ") +
                            std::to_string(ORT_API_VERSION) + " but the loading onnxruntime (" +
                            api_base->GetVersionString() +
                            ") does not provide it; use a newer onnxruntime or rebuild ocomp against its headers";
    return fallback ? fallback->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  return ocomp::guarded(*api, [&] {
    OrtCustomOpDomain* domain = nullptr;
    Ort::ThrowOnError(api->CreateCustomOpDomain(kDomain, &domain));
    // The domain must outlive the sessions; onnxruntime does not take ownership,
    // so it is kept until process exit (one small object per registration).
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &conv_op()));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &gemm_op()));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &matmul_op()));
    Ort::ThrowOnError(api->AddCustomOpDomain(options, domain));
  });
}

// The W2A8 path this process uses (OCOMP_ISA or the best the CPU runs), or
// "error: <why>" when OCOMP_ISA names a path that cannot run. For benchmark
// headers and tests (Python: ocomp.runtime.w2a8_path()).
extern "C" __attribute__((visibility("default"))) const char* OcompW2A8Path() {
  static const std::string answer = [] {
    try {
      return std::string(ocomp::w2a8_isa().name);
    } catch (const std::exception& e) {
      return std::string("error: ") + e.what();
    }
  }();
  return answer.c_str();
}
