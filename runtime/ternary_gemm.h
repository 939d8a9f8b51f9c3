// TernaryGemm and TernaryMatMul (domain "ocomp", version 1):
//   TernaryGemm(X[M,Kin], packed, alpha[N], bias[N]?) -> Y[M,N]
//   TernaryMatMul(X[..., Kin], packed, alpha[N], bias[N]?) -> Y[..., N]
//   Y = (X @ T^T) * alpha + bias, T of weight_shape (N, Kin), row n = output n.
// Optional attributes as TernaryConv: act_quant / act_scale / act_zero_point,
// activation / clip_min / clip_max (see w2a8_ops.h).
#pragma once

#include <memory>
#include <mutex>

#include "common.h"
#include "kernels.h"
#include "w2a8_ops.h"

namespace ocomp {

struct GemmPlan;

struct TernaryGemmKernel {
  TernaryGemmKernel(const OrtApi& api, const OrtKernelInfo* info, bool matmul);
  void Compute(OrtKernelContext* context);
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(Ort::GetApi(), [&] { Compute(context); });
  }

 private:
  const char* name() const { return matmul_ ? "TernaryMatMul" : "TernaryGemm"; }
  std::shared_ptr<const GemmPlan> plan_for(int64_t rows_padded, const SparseTernary& weights, bool cache);

  bool matmul_;
  int64_t N_ = 0, Kin_ = 0;
  ActAttrs act_;                          // activation quantization (W2A8) and fused activation
  std::unique_ptr<const W2A8Gemm> w2a8_;  // W2A8 weights (constant weights with act_quant set)
  bool const_weights_ = false, const_alpha_ = false, const_bias_ = false;
  SparseTernary weights_;
  std::vector<uint8_t> row_codes_;  // per output row, ceil(Kin/4) bytes of 2-bit codes (lookup path)
  std::vector<float> alpha_, bias_;
  std::mutex mutex_;
  std::shared_ptr<const GemmPlan> plan_;
};

template <bool MatMul>
struct TernaryGemmOpT : Ort::CustomOpBase<TernaryGemmOpT<MatMul>, TernaryGemmKernel, true> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded(api, [&] { *kernel = new TernaryGemmKernel(api, info, MatMul); });
  }
  const char* GetName() const { return MatMul ? "TernaryMatMul" : "TernaryGemm"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

using TernaryGemmOp = TernaryGemmOpT<false>;
using TernaryMatMulOp = TernaryGemmOpT<true>;

}  // namespace ocomp
