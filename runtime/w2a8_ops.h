// The W2A8 execution of TernaryConv / TernaryGemm / TernaryMatMul: attribute
// parsing (activation quantization, fused activation) and the drivers that
// quantize the input, lay it out for the sums of w2a8.h, run them on
// onnxruntime's intra-op pool and apply the epilogue.
#pragma once

#include <limits>

#include "common.h"
#include "w2a8.h"

namespace ocomp {

// Node attributes shared by the ternary ops.
//   act_quant: "static" (act_scale > 0 and act_zero_point in [0, 255]; act_scale
//   alone implies it) or "dynamic" (scale and zero point from each run's input
//   min/max); absent: float activations (the original add-only kernels).
//   activation: "Relu" or "Clip" (clip_min / clip_max, default -inf / +inf),
//   applied to the op's output; absent: none.
struct ActAttrs {
  enum Mode { kFloat, kStatic, kDynamic } mode = kFloat;
  ActQuant quant;
  float lo = -std::numeric_limits<float>::infinity();
  float hi = std::numeric_limits<float>::infinity();
  bool clamps() const { return lo != -std::numeric_limits<float>::infinity() || hi != std::numeric_limits<float>::infinity(); }
};

ActAttrs read_act_attrs(const OrtApi& api, const OrtKernelInfo* info, const char* op);

// int8 chaining (TernaryConv): uint8 codes handed from one W2A8 conv to the next in the layout the consumer
// reads, so neither converts. The one layout, "nhwc_c4": [N, H, W, round4(C)] uint8, pixel-major, the
// channels padded to a multiple of 4 (the consumer's quads) with the zero point.
//   input_layout="nhwc_c4": X is such a tensor, already quantized with this node's act_scale /
//   act_zero_point (static act_quant, group 1, C/group > 1).
//   output_layout="nhwc_c4": the node writes its output (after bias, residual, fused activation) as such a
//   tensor, quantized with output_scale / output_zero_point (the consumer's act_scale / act_zero_point) by
//   the consumer's own quantize_one, to its optional output 1 (uint8); output 0 (float NCHW) is written as
//   well when the node has it (other readers: a residual branch, a graph output). C/group > 1.
constexpr const char* kCodesLayout = "nhwc_c4";
struct ChainAttrs {
  bool codes_in = false, codes_out = false;
  ActQuant out;  // quantization of the output codes
};
ChainAttrs read_chain_attrs(const OrtApi& api, const OrtKernelInfo* info, const char* op);

// The fused activation; NaN stays NaN.
inline float clamp_out(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// A fused residual Add: y[i] = clamp_out(y[i] + r[i], lo, hi), i < n (y holds the unclamped op output).
void add_residual(float* y, const float* r, int64_t n, float lo, float hi);

// Per-tensor quantization of this run's input: the static one, or min/max of x.
ActQuant run_quant(const ActAttrs& act, OrtKernelContext* context, const float* x, int64_t count);

struct W2A8ConvShape {
  int64_t K = 0, Cg = 0, kH = 0, kW = 0, group = 1;
  int64_t sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t pt = 0, pl = 0, pb = 0, pr = 0;
};

// TernaryConv weights repacked for W2A8 (dense: K x Cg x kH x kW in {-1,0,1}).
class W2A8Conv {
 public:
  W2A8Conv(const W2A8ConvShape& shape, const int8_t* dense);
  // x [N, C, H, W] -> y [N, K, OH, OW] (OH, OW as computed by the caller). residual (nullable): a float
  // tensor of y's shape added after the bias, before the clamp to [lo, hi] (a fused residual Add).
  // Chaining (not depthwise): xq (instead of x) the input as "nhwc_c4" codes of quantization q (group 1);
  // yq the output as "nhwc_c4" codes [N, OH, OW, round4(K)] of quantization yquant (y nullable then: the
  // float output is written too when given).
  void run(OrtKernelContext* context, const float* x, int64_t N, int64_t H, int64_t W, int64_t OH, int64_t OW,
           const ActQuant& q, const float* alpha, const float* bias, float lo, float hi, const float* residual,
           float* y, const uint8_t* xq = nullptr, uint8_t* yq = nullptr, ActQuant yquant = {}) const;
  bool depthwise() const { return depthwise_; }

 private:
  void run_depthwise(OrtKernelContext* context, const float* x, int64_t N, int64_t H, int64_t W, int64_t OH,
                     int64_t OW, const ActQuant& q, const float* mul, const float* bias, float lo, float hi,
                     const float* residual, float* y) const;
  W2A8ConvShape s_;
  const W2A8Isa* isa_;
  bool depthwise_ = false;     // Cg == 1: planar rows instead of channel quads
  int64_t Cp_ = 0;             // channels padded to a multiple of 4 (quads)
  std::vector<W2A8Weights> groups_;
  std::vector<int8_t> dw_weights_;  // depthwise: K x kH x kW
  std::vector<int32_t> dw_wsum_;
};

// TernaryGemm / TernaryMatMul weights (dense: N x Kin) repacked for W2A8.
class W2A8Gemm {
 public:
  W2A8Gemm(int64_t N, int64_t Kin, const int8_t* dense);
  // x [M, Kin] -> y [M, N]
  void run(OrtKernelContext* context, const float* x, int64_t M, const ActQuant& q, const float* alpha,
           const float* bias, float lo, float hi, float* y) const;

 private:
  int64_t N_ = 0, Kin_ = 0, Kp_ = 0;
  const W2A8Isa* isa_;
  W2A8Weights w_;
  std::vector<int32_t> offsets_;
};

// Dense {-1, 0, 1} weights (outputs x rows) from the decoded sparse lists.
std::vector<int8_t> dense_weights(const SparseTernary& w);

}  // namespace ocomp
