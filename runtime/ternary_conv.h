// TernaryConv (domain "ocomp", version 1):
//   Y[N,K,OH,OW] = alpha[k] * (sum of X under +1 weights - sum under -1 weights) + bias[k]
// Inputs: X float [N,C,H,W], packed uint8 [ceil(numel/4)], alpha float [K],
// bias float [K] (optional), residual float [N,K,OH,OW] (optional: a fused
// residual Add, Y = activation(conv + bias + residual)). Attributes: weight_shape (K, C/group, kH, kW)
// (required), kernel_shape, strides, pads (x1_begin, x2_begin, x1_end,
// x2_end), dilations, group; defaults as ONNX Conv, no auto_pad. Optional
// act_quant / act_scale / act_zero_point (int8 activations, see w2a8_ops.h)
// and activation / clip_min / clip_max (fused output activation).
// int8 chaining (w2a8_ops.h): input_layout="nhwc_c4" makes X uint8 [N,H,W,round4(C)] codes;
// output_layout="nhwc_c4" (with output_scale / output_zero_point) writes optional output 1, uint8 codes
// [N,OH,OW,round4(K)], instead of output 0 (float Y, then absent).
#pragma once

#include <memory>
#include <mutex>

#include "common.h"
#include "kernels.h"
#include "w2a8_ops.h"

namespace ocomp {

struct ConvAttrs {
  int64_t K = 0, Cg = 0, kH = 0, kW = 0, group = 1;
  int64_t sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;
};

struct ConvPlan;

struct TernaryConvKernel {
  TernaryConvKernel(const OrtApi& api, const OrtKernelInfo* info);
  void Compute(OrtKernelContext* context);
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(Ort::GetApi(), [&] { Compute(context); });
  }

 private:
  W2A8ConvShape w2a8_shape() const;
  std::shared_ptr<const ConvPlan> plan_for(int64_t H, int64_t W, const SparseTernary& weights, bool cache);

  ConvAttrs a_;
  ActAttrs act_;                    // activation quantization (W2A8) and fused activation
  ChainAttrs chain_;                // uint8 code input / output (int8 chaining)
  std::unique_ptr<const W2A8Conv> w2a8_;  // W2A8 weights (constant weights with act_quant set)
  bool const_weights_ = false, const_alpha_ = false, const_bias_ = false;
  SparseTernary weights_;
  std::vector<float> alpha_, bias_;
  std::mutex mutex_;
  std::shared_ptr<const ConvPlan> plan_;  // for the last input size seen (constant weights)
};

struct TernaryConvOp : Ort::CustomOpBase<TernaryConvOp, TernaryConvKernel, true> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded(api, [&] { *kernel = new TernaryConvKernel(api, info); });
  }
  const char* GetName() const { return "TernaryConv"; }
  size_t GetInputTypeCount() const { return 5; }
  // X: float, or uint8 codes (input_layout); the kernel checks which.
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                      : (index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  // Output 0: float Y; output 1: uint8 codes (output_layout). Types fixed, so onnxruntime's type inference
  // (which for a custom op can only follow the input types) gives each its own.
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const { return INPUT_OUTPUT_OPTIONAL; }
};

}  // namespace ocomp
