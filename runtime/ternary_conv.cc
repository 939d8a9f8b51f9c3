// TernaryConv: direct convolution with add/sub-only accumulation.
//
// Layout trick (no im2col): the input of each (image, group) is copied once
// into zero-padded "phase planes": for stride s, plane (c, ra, rb) holds
// Xpad[c][i*s + ra][j*s + rb], Hph x Wph. Output pixel (oy, ox), computed at
// flat position p = oy*Wph + ox (columns ox >= OW are computed and dropped),
// then reads weight row (c, ky, kx) at plane(c, ky*dh % s, kx*dw % s) +
// (oy + ky*dh / s)*Wph + ox + kx*dw / s = p + offset(row). So every nonzero
// weight is one offset, and a tile of 64 consecutive outputs adds 64
// consecutive floats: see kernels.h. Stride 1 has one phase (the padded input).
// Aligned mode (stride 1, see plan_for) also keeps one pre-shifted copy per
// kernel column and pads rows to 8 floats, so every load is 32-byte aligned;
// compact mode keeps the copies with rows of exactly OW floats. Channel pairs
// are stored as x1, x2, x1 + x2, x1 - x2 so one load serves two weights.
#include "ternary_conv.h"

#include <algorithm>
#include <array>

#include "packing.h"

namespace ocomp {

namespace {

constexpr int64_t kMaxAttr = 1 << 16;     // sanity bound for kernel/stride/dilation/pad values
// Bytes of input rows a reduction block may touch: the whole 32 KiB L1d was
// measured best (the estimate counts whole tile rows; loads touch fewer lines).
constexpr int64_t kL1Budget = 32 * 1024;
// Layout choice (see plan_for): relative cost of a misaligned 8-float vector.
constexpr double kMisalignedCost = 1.05;
constexpr int64_t kMinItems = 32;  // work items per run, for load balance over the intra-op threads

// ceil(a / b) for b > 0 and any sign of a.
inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

}  // namespace

struct ConvPlan {
  int64_t H = 0, W = 0, OH = 0, OW = 0;
  int64_t Hph = 0, Wph = 0, plane = 0, nph = 0;
  int64_t Wrow = 0;   // row stride of a plane: Wph, Wph rounded up to 8 (aligned) or OW (compact)
  int64_t nplanes = 0;  // planes per input channel: phases x column shifts
  bool shifted = false;  // one pre-shifted copy of each phase plane per kernel column shift
  int64_t block = 0;  // floats per (image, group) in the rearranged buffer
  int64_t P = 0, tiles = 0, cb = 0, nblocks = 0;
  // Channel pairs (2j, 2j+1) of a group are stored as 4 pseudo-channels:
  // x[2j], x[2j+1], x[2j] + x[2j+1], x[2j] - x[2j+1] (an odd last channel as
  // one), so a pair of nonzero weights on one tap is one load and one add.
  int64_t npairs = 0, Cps = 0;  // channel pairs, pseudo-channels per group
  int64_t tile_len = 0;  // outputs per tile: a multiple of 8, <= kTile; tiles split P evenly
  std::vector<std::array<int64_t, 2>> phases;  // (ra, rb) of each stored phase plane
  std::vector<int64_t> shifts;                 // column shift (qb) of each copy of a phase plane
  std::vector<int32_t> offsets;
  std::vector<ListRef> refs;  // refs[b * K + k]
};

TernaryConvKernel::TernaryConvKernel(const OrtApi& api, const OrtKernelInfo* info) {
  bool present = false;
  std::vector<int64_t> ws = attr_ints(api, info, "weight_shape", &present);
  if (!present) throw Error("TernaryConv: attribute weight_shape (K, C/group, kH, kW) is required");
  if (ws.size() != 4) throw Error("TernaryConv: weight_shape must have 4 values (K, C/group, kH, kW), got " +
                                  std::to_string(ws.size()));
  for (int64_t v : ws)
    if (v <= 0 || v > (int64_t{1} << 24))
      throw Error("TernaryConv: weight_shape values must be in [1, 2^24], got " + shape_str(ws));
  a_.K = ws[0];
  a_.Cg = ws[1];
  a_.kH = ws[2];
  a_.kW = ws[3];
  if (a_.kH > kMaxAttr || a_.kW > kMaxAttr) throw Error("TernaryConv: kernel too large in weight_shape");

  if (attr_int(api, info, "group", &a_.group)) {
    if (a_.group < 1) throw Error("TernaryConv: group must be >= 1, got " + std::to_string(a_.group));
  }
  if (a_.K % a_.group != 0)
    throw Error("TernaryConv: K=" + std::to_string(a_.K) + " (weight_shape[0]) is not divisible by group=" +
                std::to_string(a_.group));

  std::vector<int64_t> ks = attr_ints(api, info, "kernel_shape", &present);
  if (present && (ks.size() != 2 || ks[0] != a_.kH || ks[1] != a_.kW))
    throw Error("TernaryConv: kernel_shape " + shape_str(ks) + " does not match weight_shape " + shape_str(ws));

  std::vector<int64_t> strides = attr_ints(api, info, "strides", &present);
  if (present) {
    if (strides.size() != 2 || strides[0] < 1 || strides[1] < 1 || strides[0] > kMaxAttr || strides[1] > kMaxAttr)
      throw Error("TernaryConv: strides must be 2 values >= 1, got " + shape_str(strides));
    a_.sh = strides[0];
    a_.sw = strides[1];
  }
  std::vector<int64_t> dil = attr_ints(api, info, "dilations", &present);
  if (present) {
    if (dil.size() != 2 || dil[0] < 1 || dil[1] < 1 || dil[0] > kMaxAttr || dil[1] > kMaxAttr)
      throw Error("TernaryConv: dilations must be 2 values >= 1, got " + shape_str(dil));
    a_.dh = dil[0];
    a_.dw = dil[1];
  }
  std::vector<int64_t> pads = attr_ints(api, info, "pads", &present);
  if (present) {
    if (pads.size() != 4) throw Error("TernaryConv: pads must have 4 values, got " + shape_str(pads));
    for (int64_t p : pads)
      if (p < 0 || p > kMaxAttr) throw Error("TernaryConv: pads must be in [0, 65536], got " + shape_str(pads));
    a_.pt = pads[0];
    a_.pl = pads[1];
    a_.pb = pads[2];
    a_.pr = pads[3];
  }
  size_t len = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, "auto_pad", nullptr, &len);
  if (st != nullptr) {
    api.ReleaseStatus(st);
  } else {
    std::string auto_pad(len, '\0');
    Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, "auto_pad", &auto_pad[0], &len));
    auto_pad.resize(std::strlen(auto_pad.c_str()));
    if (!auto_pad.empty() && auto_pad != "NOTSET")
      throw Error("TernaryConv: auto_pad=" + auto_pad + " is not supported; write explicit pads");
  }

  act_ = read_act_attrs(api, info, "TernaryConv");
  chain_ = read_chain_attrs(api, info, "TernaryConv");
  if ((chain_.codes_in || chain_.codes_out) && (act_.mode == ActAttrs::kFloat || a_.Cg == 1))
    throw Error("TernaryConv: input_layout / output_layout need int8 activations (act_quant) and C/group > 1");
  if (chain_.codes_in && (act_.mode != ActAttrs::kStatic || a_.group != 1))
    throw Error("TernaryConv: input_layout needs act_quant=static (the codes' scale and zero point) and group 1");
  // Constant initializers are decoded once here.
  if (const OrtValue* packed = constant_input(api, info, 1)) {
    TensorView<uint8_t> t = view_tensor<uint8_t>(packed, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "packed weights");
    weights_ = decode_sparse(t.data, t.size, a_.K, a_.Cg * a_.kH * a_.kW, "TernaryConv");
    const_weights_ = true;
    if (act_.mode != ActAttrs::kFloat) {
      w2a8_ = std::make_unique<const W2A8Conv>(w2a8_shape(), dense_weights(weights_).data());
      weights_ = SparseTernary{};  // the W2A8 panels are all that is kept
    }
  } else if (act_.mode != ActAttrs::kFloat) {
    w2a8_isa();  // an OCOMP_ISA the CPU cannot run fails at session creation
  }
  if (const OrtValue* alpha = constant_input(api, info, 2)) {
    alpha_ = read_vector(alpha, a_.K, "TernaryConv", "alpha");
    const_alpha_ = true;
  }
  if (const OrtValue* bias = constant_input(api, info, 3)) {
    bias_ = read_vector(bias, a_.K, "TernaryConv", "bias");
    const_bias_ = true;
  }
}

W2A8ConvShape TernaryConvKernel::w2a8_shape() const {
  W2A8ConvShape s;
  s.K = a_.K, s.Cg = a_.Cg, s.kH = a_.kH, s.kW = a_.kW, s.group = a_.group;
  s.sh = a_.sh, s.sw = a_.sw, s.dh = a_.dh, s.dw = a_.dw;
  s.pt = a_.pt, s.pl = a_.pl, s.pb = a_.pb, s.pr = a_.pr;
  return s;
}

std::shared_ptr<const ConvPlan> TernaryConvKernel::plan_for(int64_t H, int64_t W, const SparseTernary& weights,
                                                            bool cache) {
  if (cache) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (plan_ && plan_->H == H && plan_->W == W) return plan_;
  }
  const ConvAttrs& a = a_;
  auto plan = std::make_shared<ConvPlan>();
  ConvPlan& p = *plan;
  p.H = H;
  p.W = W;
  const int64_t Hp = H + a.pt + a.pb, Wp = W + a.pl + a.pr;
  const int64_t eff_h = a.dh * (a.kH - 1) + 1, eff_w = a.dw * (a.kW - 1) + 1;
  if (Hp < eff_h || Wp < eff_w)
    throw Error("TernaryConv: padded input " + std::to_string(Hp) + "x" + std::to_string(Wp) +
                " is smaller than the dilated kernel " + std::to_string(eff_h) + "x" + std::to_string(eff_w));
  p.OH = (Hp - eff_h) / a.sh + 1;
  p.OW = (Wp - eff_w) / a.sw + 1;
  p.Hph = (Hp + a.sh - 1) / a.sh;
  p.Wph = (Wp + a.sw - 1) / a.sw;

  // Layouts. Unaligned: one plane per phase with rows of Wph floats; a kernel
  // column shift is part of the offset. The shifted layouts keep one
  // pre-shifted copy of each plane per kernel column shift qb instead, so a
  // row only needs the OW computed columns:
  //  * aligned: rows padded to 8 floats; every offset is a multiple of 8
  //    floats and no 32-byte load straddles a cache line (about a quarter
  //    faster than unaligned);
  //  * compact: rows of exactly OW floats, so no computed output is dropped
  //    (and aligned as well when OW is a multiple of 8). Wins on small planes
  //    (14x14, 7x7), where the padding columns are a large share of the work.
  // Shifted layouts are for stride 1 only (with stride 2 the extra copies cost
  // more than they save), and only without channel pairs (see ConvPlan::npairs):
  // paired, the copies no longer fit L2, and the unaligned paired layout was
  // measured faster on every ResNet-18 shape (e.g. 14x14: 0.79x vs 1.0x of ORT
  // Conv; 7x7: 0.85x vs 0.99x). So they serve Cg == 1 (depthwise). Among them
  // the cheapest estimate wins: computed 8-float vectors, misaligned ones
  // weighted kMisalignedCost.
  const int64_t wrow8 = (p.Wph + 7) / 8 * 8;
  p.Wrow = p.Wph;
  const bool paired = a.Cg >= 2;
  if (a.sw == 1 && !paired) {
    auto cost = [&](int64_t wrow) {
      return double((p.OH * wrow + 7) / 8) * (wrow % 8 == 0 ? 1.0 : kMisalignedCost);
    };
    const double c_unaligned = cost(p.Wph);
    const double c_aligned = cost(wrow8), c_compact = cost(p.OW);
    if (c_compact <= c_aligned && c_compact < c_unaligned) {
      p.Wrow = p.OW;
      p.shifted = true;
    } else if (c_aligned < c_unaligned) {
      p.Wrow = wrow8;
      p.shifted = true;
    }
  }

  // Phase planes actually read by some kernel tap, and each tap's offset in a channel.
  const int64_t taps = a.kH * a.kW;
  std::vector<int64_t> tap_plane(taps), tap_shift(taps);
  std::vector<std::array<int64_t, 2>> tap_phase_shift(taps);
  for (int64_t ky = 0; ky < a.kH; ++ky)
    for (int64_t kx = 0; kx < a.kW; ++kx) {
      const std::array<int64_t, 2> ph{(ky * a.dh) % a.sh, (kx * a.dw) % a.sw};
      auto it = std::find(p.phases.begin(), p.phases.end(), ph);
      if (it == p.phases.end()) it = p.phases.insert(p.phases.end(), ph);
      const int64_t qa = ky * a.dh / a.sh, qb = kx * a.dw / a.sw;
      int64_t shift_index = 0;
      if (p.shifted) {
        auto sit = std::find(p.shifts.begin(), p.shifts.end(), qb);
        if (sit == p.shifts.end()) sit = p.shifts.insert(p.shifts.end(), qb);
        shift_index = sit - p.shifts.begin();
      }
      tap_phase_shift[ky * a.kW + kx] = {it - p.phases.begin(), shift_index};
      tap_shift[ky * a.kW + kx] = qa * p.Wrow + (p.shifted ? 0 : qb);
    }
  if (!p.shifted) p.shifts = {0};
  p.nph = static_cast<int64_t>(p.phases.size());
  const int64_t nsh = static_cast<int64_t>(p.shifts.size());
  p.nplanes = p.nph * nsh;
  p.plane = (p.Hph * p.Wrow + 7) / 8 * 8;
  // An odd number of 32-byte units per plane: with a power-of-two stride
  // (e.g. 16x16 planes) the planes of a block map to a few L1 sets and evict
  // each other.
  if ((p.plane / 8) % 2 == 0) p.plane += 8;
  for (int64_t t = 0; t < taps; ++t) tap_plane[t] = tap_phase_shift[t][0] * nsh + tap_phase_shift[t][1];
  const int64_t max_shift = *std::max_element(tap_shift.begin(), tap_shift.end());

  p.P = p.OH * p.Wrow;
  p.tiles = (p.P + kTile - 1) / kTile;
  const int64_t vecs = (p.P + 7) / 8;
  p.tile_len = (vecs + p.tiles - 1) / p.tiles * 8;
  p.npairs = paired ? a.Cg / 2 : 0;
  p.Cps = 4 * p.npairs + (a.Cg - 2 * p.npairs);
  const double block = double(p.Cps) * p.nplanes * p.plane + double(max_shift) + double(p.tiles) * kTile + 16;
  if (block > double(INT32_MAX) - 64)
    throw Error("TernaryConv: input too large for one image (" + std::to_string(a.Cg) + " channels of " +
                std::to_string(H) + "x" + std::to_string(W) + ")");
  p.block = (p.Cps * p.nplanes * p.plane + max_shift + p.tiles * kTile + 16 + 15) / 16 * 16;

  // Reduction blocks of cb input channels (even when paired) whose rows for one
  // tile stay in L1 (a pair takes 4 pseudo-channels).
  const int64_t footprint = p.nplanes * (p.tile_len + max_shift) * int64_t(sizeof(float));
  const int64_t per_channel = p.npairs > 0 ? 2 * footprint : footprint;
  p.cb = std::max<int64_t>(1, std::min<int64_t>(a.Cg, kL1Budget / std::max<int64_t>(per_channel, 1)));
  if (p.npairs > 0 && p.cb < a.Cg) p.cb = std::max<int64_t>(2, p.cb / 2 * 2);
  p.nblocks = (a.Cg + p.cb - 1) / p.cb;

  p.refs.resize(static_cast<size_t>(p.nblocks * a.K));
  p.offsets.reserve(weights.index.size());
  std::vector<int8_t> dense(static_cast<size_t>(a.Cg * taps));
  std::vector<int32_t> plus_list, minus_list;
  for (int64_t k = 0; k < a.K; ++k) {
    std::fill(dense.begin(), dense.end(), int8_t{0});
    const int32_t* idx = weights.index.data() + weights.start[k];
    const int64_t count = weights.start[k + 1] - weights.start[k];
    for (int64_t i = 0; i < count; ++i) dense[idx[i]] = i < weights.nplus[k] ? 1 : -1;
    for (int64_t b = 0; b < p.nblocks; ++b) {
      ListRef& ref = p.refs[b * a.K + k];
      ref.begin = static_cast<int32_t>(p.offsets.size());
      plus_list.clear();
      minus_list.clear();
      auto emit = [&](int64_t ps, int64_t tap, int sign) {
        const int32_t off = static_cast<int32_t>((ps * p.nplanes + tap_plane[tap]) * p.plane + tap_shift[tap]);
        (sign > 0 ? plus_list : minus_list).push_back(off);
      };
      const int64_t c_end = std::min(a.Cg, (b + 1) * p.cb);
      for (int64_t c = b * p.cb; c < c_end;) {
        if (c < 2 * p.npairs) {
          const int64_t j = c / 2;
          for (int64_t tap = 0; tap < taps; ++tap) {
            const int w1 = dense[c * taps + tap], w2 = dense[(c + 1) * taps + tap];
            if (w1 == 0 && w2 == 0) continue;
            if (w2 == 0) emit(4 * j, tap, w1);
            else if (w1 == 0) emit(4 * j + 1, tap, w2);
            else if (w1 == w2) emit(4 * j + 2, tap, w1);
            else emit(4 * j + 3, tap, w1);  // w1 * (x1 - x2)
          }
          c += 2;
        } else {
          for (int64_t tap = 0; tap < taps; ++tap)
            if (dense[c * taps + tap] != 0) emit(4 * p.npairs + (c - 2 * p.npairs), tap, dense[c * taps + tap]);
          c += 1;
        }
      }
      std::sort(plus_list.begin(), plus_list.end());
      std::sort(minus_list.begin(), minus_list.end());
      p.offsets.insert(p.offsets.end(), plus_list.begin(), plus_list.end());
      p.offsets.insert(p.offsets.end(), minus_list.begin(), minus_list.end());
      ref.nplus = static_cast<int32_t>(plus_list.size());
      ref.nminus = static_cast<int32_t>(minus_list.size());
    }
  }
  if (cache) {
    std::lock_guard<std::mutex> lock(mutex_);
    plan_ = plan;
  }
  return plan;
}

void TernaryConvKernel::Compute(OrtKernelContext* context) {
  const OrtApi& api = Ort::GetApi();
  Ort::KernelContext ctx(context);
  const ConvAttrs& a = a_;

  TensorView<float> x;
  TensorView<uint8_t> xq;
  int64_t N = 0, C = 0, H = 0, W = 0;
  if (chain_.codes_in) {
    xq = view_tensor<uint8_t>(ctx.GetInput(0), ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "X (input_layout codes)");
    const int64_t Cp = (a.Cg * a.group + 3) / 4 * 4;
    if (xq.shape.size() != 4 || xq.shape[3] != Cp)
      throw Error("TernaryConv: X (input_layout " + std::string(kCodesLayout) + ") must be 4-D [N,H,W," +
                  std::to_string(Cp) + "], got shape " + shape_str(xq.shape));
    N = xq.shape[0], C = a.Cg * a.group, H = xq.shape[1], W = xq.shape[2];
  } else {
    x = view_tensor<float>(ctx.GetInput(0), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "X");
    if (x.shape.size() != 4) throw Error("TernaryConv: X must be 4-D [N,C,H,W], got shape " + shape_str(x.shape));
    N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  }
  if (C != a.Cg * a.group)
    throw Error("TernaryConv: X has " + std::to_string(C) + " channels, but weight_shape[1] * group = " +
                std::to_string(a.Cg) + " * " + std::to_string(a.group) + " = " + std::to_string(a.Cg * a.group));

  SparseTernary runtime_weights;
  const SparseTernary* weights = &weights_;
  if (!const_weights_) {
    TensorView<uint8_t> t = view_tensor<uint8_t>(ctx.GetInput(1), ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "packed");
    runtime_weights = decode_sparse(t.data, t.size, a.K, a.Cg * a.kH * a.kW, "TernaryConv");
    weights = &runtime_weights;
  }
  std::vector<float> runtime_alpha, runtime_bias;
  const std::vector<float>* alpha = &alpha_;
  if (!const_alpha_) {
    runtime_alpha = read_vector(ctx.GetInput(2), a.K, "TernaryConv", "alpha");
    alpha = &runtime_alpha;
  }
  const std::vector<float>* bias = &bias_;
  if (!const_bias_) {
    bias = nullptr;
    if (ctx.GetInputCount() > 3) {
      Ort::ConstValue b = ctx.GetInput(3);
      if (b) {
        runtime_bias = read_vector(b, a.K, "TernaryConv", "bias");
        bias = &runtime_bias;
      }
    }
  }

  // The fused residual Add's input: exactly the output's shape (no broadcasting).
  const float* residual = nullptr;
  auto read_residual = [&](int64_t OH, int64_t OW) {
    if (ctx.GetInputCount() <= 4) return;
    Ort::ConstValue r = ctx.GetInput(4);
    if (!r) return;
    TensorView<float> rv = view_tensor<float>(r, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "residual");
    const std::vector<int64_t> want{N, a.K, OH, OW};
    if (rv.shape != want)
      throw Error("TernaryConv: residual has shape " + shape_str(rv.shape) + ", expected the output's shape " +
                  shape_str(want));
    residual = rv.data;
  };

  if (act_.mode != ActAttrs::kFloat) {
    const int64_t Hp = H + a.pt + a.pb, Wp = W + a.pl + a.pr;
    const int64_t eff_h = a.dh * (a.kH - 1) + 1, eff_w = a.dw * (a.kW - 1) + 1;
    if (Hp < eff_h || Wp < eff_w)
      throw Error("TernaryConv: padded input " + std::to_string(Hp) + "x" + std::to_string(Wp) +
                  " is smaller than the dilated kernel " + std::to_string(eff_h) + "x" + std::to_string(eff_w));
    const int64_t OH = (Hp - eff_h) / a.sh + 1, OW = (Wp - eff_w) / a.sw + 1;
    read_residual(OH, OW);
    float* y = nullptr;
    uint8_t* yq = nullptr;
    if (chain_.codes_out) {
      if (ctx.GetOutputCount() < 2) throw Error("TernaryConv: output_layout writes output 1, which the node lacks");
      Ort::UnownedValue v = ctx.GetOutput(1, std::vector<int64_t>{N, OH, OW, (a.K + 3) / 4 * 4});
      if (!v) throw Error("TernaryConv: output_layout writes output 1, which the node lacks");
      yq = v.GetTensorMutableData<uint8_t>();
      Ort::UnownedValue f = ctx.GetOutput(0, std::vector<int64_t>{N, a.K, OH, OW});  // null when absent
      if (f) y = f.GetTensorMutableData<float>();
    } else {
      Ort::UnownedValue v = ctx.GetOutput(0, std::vector<int64_t>{N, a.K, OH, OW});
      if (!v) throw Error("TernaryConv: output 0 (Y) is absent (output 1 needs output_layout)");
      y = v.GetTensorMutableData<float>();
    }
    if (N == 0) return;
    std::unique_ptr<const W2A8Conv> runtime_w2a8;
    const W2A8Conv* w2a8 = w2a8_.get();
    if (w2a8 == nullptr) {
      runtime_w2a8 = std::make_unique<const W2A8Conv>(w2a8_shape(), dense_weights(*weights).data());
      w2a8 = runtime_w2a8.get();
    }
    const ActQuant q = run_quant(act_, context, x.data, x.size);  // static when chained (no read of x)
    w2a8->run(context, x.data, N, H, W, OH, OW, q, alpha->data(), bias ? bias->data() : nullptr, act_.lo, act_.hi,
              residual, y, xq.data, yq, chain_.out);
    return;
  }

  std::shared_ptr<const ConvPlan> plan_ptr = plan_for(H, W, *weights, const_weights_);
  const ConvPlan& p = *plan_ptr;
  read_residual(p.OH, p.OW);
  std::vector<int64_t> out_shape{N, a.K, p.OH, p.OW};
  Ort::UnownedValue y_value = ctx.GetOutput(0, out_shape);
  if (!y_value) throw Error("TernaryConv: output 0 (Y) is absent (output 1 needs output_layout)");
  float* y = y_value.GetTensorMutableData<float>();
  if (N == 0 || p.OH == 0 || p.OW == 0) return;

  const int64_t G = a.group, Cg = a.Cg, Kg = a.K / G;
  float* buf = thread_scratch(static_cast<size_t>(N * G * p.block));
  const float* xd = x.data;

  // 1. Zero-padded phase planes, one work item per (image, channel).
  auto fill = [&](size_t item) {
    const int64_t n = int64_t(item) / C, cc = int64_t(item) % C;
    const int64_t g = cc / Cg, c = cc % Cg;
    const float* src = xd + (n * C + cc) * H * W;
    float* blk = buf + (n * G + g) * p.block;
    const int64_t ps = c < 2 * p.npairs ? 4 * (c / 2) + (c % 2) : 4 * p.npairs + (c - 2 * p.npairs);
    float* dst = blk + ps * p.nplanes * p.plane;
    const int64_t nsh = static_cast<int64_t>(p.shifts.size());
    for (int64_t pl = 0; pl < p.nplanes; ++pl) {
      const int64_t ra = p.phases[pl / nsh][0], rb = p.phases[pl / nsh][1], qb = p.shifts[pl % nsh];
      float* plane = dst + pl * p.plane;
      // Plane column j holds input column j*sw + lead (zero outside [0, W)).
      const int64_t lead = qb * a.sw + rb - a.pl;
      const int64_t j0 = std::min<int64_t>(p.Wrow, std::max<int64_t>(0, ceil_div(-lead, a.sw)));
      const int64_t j1 = std::max<int64_t>(j0, std::min<int64_t>(p.Wrow, ceil_div(W - lead, a.sw)));
      for (int64_t i = 0; i < p.Hph; ++i) {
        float* row = plane + i * p.Wrow;
        const int64_t sy = i * a.sh + ra - a.pt;
        if (sy < 0 || sy >= H) {
          std::memset(row, 0, sizeof(float) * p.Wrow);
          continue;
        }
        const float* srow = src + sy * W;
        std::memset(row, 0, sizeof(float) * j0);
        if (a.sw == 1) {
          if (j1 > j0) std::memcpy(row + j0, srow + (j0 + lead), sizeof(float) * (j1 - j0));
        } else if (a.sw == 2) {  // constant stride: GCC vectorizes the de-interleave
          const float* __restrict s0 = srow + (j0 * 2 + lead);
          float* __restrict d0 = row + j0;
          for (int64_t j = 0; j < j1 - j0; ++j) d0[j] = s0[2 * j];
        } else {
          const float* s0 = srow + (j0 * a.sw + lead);
          for (int64_t j = 0; j < j1 - j0; ++j) row[j0 + j] = s0[j * a.sw];
        }
        std::memset(row + j1, 0, sizeof(float) * (p.Wrow - j1));
      }
      // Rounding slack at the end of the plane.
      std::memset(plane + p.Hph * p.Wrow, 0, sizeof(float) * (p.plane - p.Hph * p.Wrow));
    }
    if (c == Cg - 1) {  // the slack after the last plane (read by dropped outputs only)
      float* tail = blk + p.Cps * p.nplanes * p.plane;
      std::memset(tail, 0, sizeof(float) * (p.block - p.Cps * p.nplanes * p.plane));
    }
  };
  parallel_for(context, static_cast<size_t>(N * C), fill);

  // 1b. Sum and difference planes of each channel pair (adds only).
  const int64_t pair_floats = p.nplanes * p.plane;
  auto combine = [&](size_t item) {
    const int64_t npg = p.npairs;
    const int64_t img = int64_t(item) / npg, j = int64_t(item) % npg;  // img = n * G + g
    float* base = buf + img * p.block + 4 * j * pair_floats;
    const float* __restrict x1 = base;
    const float* __restrict x2 = base + pair_floats;
    float* __restrict sum = base + 2 * pair_floats;
    float* __restrict diff = base + 3 * pair_floats;
    for (int64_t i = 0; i < pair_floats; ++i) {
      sum[i] = x1[i] + x2[i];
      diff[i] = x1[i] - x2[i];
    }
  };
  if (p.npairs > 0) parallel_for(context, static_cast<size_t>(N * G * p.npairs), combine);

  // 2. Tiles of 64 outputs x 16 output channels, reduction in L1-sized blocks.
  const AccumulateFn accumulate = accumulate_kernel();
  const int64_t kchunks = (Kg + kChunk - 1) / kChunk;
  // A work item covers several 16-channel chunks of one tile, so a core reuses
  // the tile's input rows from its own L2; items stay numerous enough
  // (>= kMinItems) to balance the threads.
  const int64_t tiles_total = N * G * p.tiles;
  const int64_t kgroups = std::min(kchunks, std::max<int64_t>(1, (kMinItems + tiles_total - 1) / tiles_total));
  const int64_t chunks_per_item = (kchunks + kgroups - 1) / kgroups;
  const float* alpha_d = alpha->data();
  const float* bias_d = bias ? bias->data() : nullptr;
  const bool clamps = act_.clamps() || residual != nullptr;
  const float lo = act_.lo, hi = act_.hi;
  auto work = [&](size_t item) {
    int64_t rest = int64_t(item);
    const int64_t kgroup = rest % kgroups;
    rest /= kgroups;
    const int64_t tile = rest % p.tiles;
    rest /= p.tiles;
    const int64_t g = rest % G, n = rest / G;
    const int64_t p0 = tile * p.tile_len;
    const float* xt = buf + (n * G + g) * p.block + p0;
    const int64_t p1 = std::min<int64_t>(p0 + p.tile_len, p.P);
    const int npix = static_cast<int>((p1 - p0 + 7) / 8 * 8);
    alignas(64) float partial[kChunk * kTile];
    const int64_t kc_end = std::min(kchunks, (kgroup + 1) * chunks_per_item);
    for (int64_t kc = kgroup * chunks_per_item; kc < kc_end; ++kc) {
      const int64_t k0 = g * Kg + kc * kChunk;
      const int nk = static_cast<int>(std::min<int64_t>(kChunk, Kg - kc * kChunk));
      for (int64_t b = 0; b < p.nblocks; ++b)
        accumulate(xt, p.offsets.data(), &p.refs[b * a.K + k0], nk, partial, b == 0, npix);
      for (int kk = 0; kk < nk; ++kk) {
        const int64_t k = k0 + kk;
        const float al = alpha_d[k], bi = bias_d ? bias_d[k] : 0.0f;
        const float* src = partial + kk * kTile - p0;
        float* dst = y + (n * a.K + k) * p.OH * p.OW;
        const float* res = residual != nullptr ? residual + (n * a.K + k) * p.OH * p.OW : nullptr;
        // Row segments of the tile; columns ox >= OW are dropped.
        for (int64_t q = p0; q < p1;) {
          const int64_t oy = q / p.Wrow, ox = q - oy * p.Wrow;
          const int64_t seg_end = std::min(p1, q - ox + p.Wrow);
          const int64_t valid = std::max<int64_t>(0, std::min(seg_end - q, p.OW - ox));
          float* __restrict out = dst + oy * p.OW + ox;
          const float* __restrict in = src + q;
          if (res != nullptr) {  // fused residual Add, then the activation
            const float* __restrict rr = res + oy * p.OW + ox;
            for (int64_t i = 0; i < valid; ++i) {
              const float v = in[i] * al + bi;
              out[i] = clamp_out(v + rr[i], lo, hi);
            }
          } else if (clamps)
            for (int64_t i = 0; i < valid; ++i) out[i] = clamp_out(in[i] * al + bi, lo, hi);
          else
            for (int64_t i = 0; i < valid; ++i) out[i] = in[i] * al + bi;
          q = seg_end;
        }
      }
    }
  };
  parallel_for(context, static_cast<size_t>(tiles_total * kgroups), work);
  (void)api;
}

}  // namespace ocomp
