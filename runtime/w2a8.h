// W2A8: ternary (2-bit) weights with 8-bit activations.
//
// The op quantizes its float input to uint8 with one per-tensor scale s and
// zero point z (static, from the node's act_scale/act_zero_point, or dynamic,
// from the input's min/max per run) and sums the uint8 activations under the
// -1/0/+1 weights in int32 (exact). Per output channel k:
//   y = float(acc - z * wsum[k]) * (alpha[k] * s) + bias[k]
// (two float roundings, no FMA, identical on every ISA), then the optional
// fused activation clamp.
//
// Weights stay 2-bit in memory, repacked at kernel creation into panels of 16
// output channels. The reduction runs over "quads": 4 consecutive activation
// bytes (4 input channels of one kernel tap, or 4 consecutive GEMM inputs).
// A block of 4 quads x 16 channels is 64 bytes: byte j holds channel j / 4,
// element j % 4; bits 2i..2i+1 of it the weight of quad i of the block, in the
// codec's code (00 = 0, 01 = +1, 10 = -1; see packing.h). That is one zmm,
// two ymm or four NEON q registers, unpacked in registers by shift, and and a
// byte table lookup (pshufb / tbl) straight into the s8 operand of vpdpbusd /
// vpmaddubsw / sdot.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ocomp {

constexpr int kPanel = 16;       // output channels of a panel
constexpr int kMaxRun = 8;       // output pixels (GEMM rows) of one micro-kernel call
constexpr int kBlockBytes = 64;  // packed bytes of 4 quads x 16 channels

// Raw sums of one run of np (1..kMaxRun) pixels against one panel:
//   out[j * 16 + c] = sum_q sum_e a[j * pixel_stride + quad_offset[q] + e] * w[c][q][e]
// over nblocks * 4 quads (a: uint8, w: -1/0/+1). wsum[c] (sum of channel c's
// weights) lets paths that work on a - 128 (NEON sdot) return the same sums.
using DotFn = void (*)(const uint8_t* a, int64_t pixel_stride, const int32_t* quad_offset, int64_t nblocks,
                       const uint8_t* panel, const int32_t* wsum, int np, int32_t* out);

// Depthwise rows (one input channel plane per output channel):
//   acc[ox] = sum_{taps t} w[t] * rows[ky(t) * dh * row_stride + ox * sw + kx(t) * dw], ox < OW
// rows: uint8 plane with row stride row_stride starting at the window's top row.
using DepthwiseRowFn = void (*)(const uint8_t* rows, int64_t row_stride, const int8_t* w, int kH, int kW, int dh,
                                int dw, int sw, int64_t OW, int32_t* acc);

// out[i] = quantize_one(x[i], inv_scale, zero_point), i < n.
using QuantizeRowFn = void (*)(const float* x, int64_t n, float inv_scale, int32_t zero_point, uint8_t* out);

// The epilogue of one run: out[j * 16 + c] = clamp(float(tile[j * 16 + c] - zc[c]) * mul[c] + add[c], lo, hi).
using EpilogueFn = void (*)(const int32_t* tile, int np, const int32_t* zc, const float* mul, const float* add,
                            float lo, float hi, float* out);

// The epilogue of one depthwise channel: out[i] = clamp(float(acc[i] - zc) * mul + add, lo, hi), i < n.
using ScaleRowFn = void (*)(const int32_t* acc, int64_t n, int32_t zc, float mul, float add, float lo, float hi,
                            float* out);

// Two panels at once (the same sums as two DotFn calls, into out0 and out1): each activation broadcast feeds
// 32 output channels, halving the loads per multiply-add. nullptr on paths without it.
using Dot2Fn = void (*)(const uint8_t* a, int64_t pixel_stride, const int32_t* quad_offset, int64_t nblocks,
                        const uint8_t* panel0, const uint8_t* panel1, int np, int32_t* out0, int32_t* out1);

struct W2A8Isa {
  const char* name;
  DotFn dot;
  DepthwiseRowFn depthwise_row;
  QuantizeRowFn quantize_row;
  EpilogueFn epilogue;
  ScaleRowFn scale_row;
  Dot2Fn dot2;
};

// The paths compiled into this build, best first; each says whether this CPU runs it.
struct IsaEntry {
  const W2A8Isa* isa;
  bool supported;
};
std::vector<IsaEntry> w2a8_paths();

// The path to use: $OCOMP_ISA when set (throws Error naming the reason when
// that path is unknown, not compiled in or not supported by this CPU),
// otherwise the best supported one. Decided once per process.
const W2A8Isa& w2a8_isa();

// Ternary weights of `outputs` channels x `quads` quads repacked into panels.
struct W2A8Weights {
  int64_t outputs = 0, panels = 0, quads = 0, nblocks = 0;
  std::vector<uint8_t> bits;  // panels x nblocks x 64 bytes
  std::vector<int32_t> wsum;  // panels x 16 (0 for padding channels)
  const uint8_t* panel(int64_t p) const { return bits.data() + p * nblocks * kBlockBytes; }
};

// weight(k, q, e) in {-1, 0, 1} for channel k < outputs, quad q < quads, element e < 4.
template <class F>
W2A8Weights pack_w2a8(int64_t outputs, int64_t quads, F&& weight) {
  W2A8Weights w;
  w.outputs = outputs;
  w.panels = (outputs + kPanel - 1) / kPanel;
  w.quads = quads;
  w.nblocks = (quads + 3) / 4;
  w.bits.assign(static_cast<size_t>(w.panels * w.nblocks * kBlockBytes), 0);
  w.wsum.assign(static_cast<size_t>(w.panels * kPanel), 0);
  for (int64_t k = 0; k < outputs; ++k) {
    const int64_t p = k / kPanel, c = k % kPanel;
    uint8_t* base = w.bits.data() + p * w.nblocks * kBlockBytes;
    int32_t sum = 0;
    for (int64_t q = 0; q < quads; ++q)
      for (int e = 0; e < 4; ++e) {
        const int v = weight(k, q, e);
        if (v == 0) continue;
        sum += v;
        const uint8_t code = v > 0 ? 0b01 : 0b10;
        base[(q / 4) * kBlockBytes + c * 4 + e] |= static_cast<uint8_t>(code << (2 * (q % 4)));
      }
    w.wsum[p * kPanel + c] = sum;
  }
  return w;
}

// Activation quantization of one tensor.
struct ActQuant {
  float scale = 1.0f;
  int32_t zero_point = 0;
};

// uint8 code of x: clamp(round_half_even(x * inv_scale) + zero_point, 0, 255); NaN -> 0.
// Clamped first (the bounds are integers, so the order does not matter), then
// rounded by the 1.5 * 2^23 trick: exact round-half-even in the default
// rounding mode for |v| <= 2^22, no libm call, vectorizable, the same on every ISA.
inline uint8_t quantize_one(float x, float inv_scale, int32_t zero_point) {
  const float lo = static_cast<float>(-zero_point), hi = static_cast<float>(255 - zero_point);
  float v = x * inv_scale;
  v = v > lo ? v : lo;  // NaN -> lo
  v = v < hi ? v : hi;
  const float r = (v + 12582912.0f) - 12582912.0f;
  return static_cast<uint8_t>(static_cast<int32_t>(r) + zero_point);
}

// Dynamic mode: the asymmetric uint8 range of [min(lo, 0), max(hi, 0)]
// (onnxruntime's DynamicQuantizeLinear rule). A constant-zero tensor gets scale 1.
ActQuant dynamic_quant(float lo, float hi);

}  // namespace ocomp
