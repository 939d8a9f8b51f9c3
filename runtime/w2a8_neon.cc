// NEON paths of the W2A8 sums (aarch64). Activations are used as s8 (a - 128,
// one eor) and the sums corrected by 128 * wsum per channel, so both return
// the exact uint8 sums of the contract in w2a8.h. A 64-byte block is four q
// registers of 4 channels x 4 elements, unpacked by ushr, and, tbl.
//  * "neon-dot" (this file with OCOMP_W2A8_DOTPROD, -march=armv8.2-a+dotprod):
//    sdot, one instruction per quad and 4 channels.
//  * "neon": smull/smull2 + sadalp (pair sums into int32, folded at the end).
#include <arm_neon.h>

#include <cstring>

#include "w2a8.h"
#include "w2a8_portable.h"

#ifdef OCOMP_W2A8_DOTPROD
#define OCOMP_W2A8_ISA_NAME "neon-dot"
#define OCOMP_W2A8_ISA_VAR kW2A8NeonDot
#else
#define OCOMP_W2A8_ISA_NAME "neon"
#define OCOMP_W2A8_ISA_VAR kW2A8Neon
#endif

namespace ocomp {
namespace {

// The 4 activation bytes at p as s8 (a - 128), replicated over 4 lanes.
inline int8x16_t quad_s8(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_u32(vdupq_n_u32(v)), vdupq_n_u8(0x80)));
}

inline void unpack(const uint8_t* p, int8x16_t w[4]) {
  static const int8_t k0[16] = {0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0};
  static const int8_t k1[16] = {0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, 0, 0, 0, 0};
  const int8x16_t lut0 = vld1q_s8(k0), lut1 = vld1q_s8(k1);
  const uint8x16_t m3 = vdupq_n_u8(0x03), mc = vdupq_n_u8(0x0C);
  const uint8x16_t v = vld1q_u8(p), v4 = vshrq_n_u8(v, 4);
  w[0] = vqtbl1q_s8(lut0, vandq_u8(v, m3));
  w[1] = vqtbl1q_s8(lut1, vandq_u8(v, mc));
  w[2] = vqtbl1q_s8(lut0, vandq_u8(v4, m3));
  w[3] = vqtbl1q_s8(lut1, vandq_u8(v4, mc));
}

#ifdef OCOMP_W2A8_DOTPROD
template <int NP>
void dot_np(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel,
            const int32_t* wsum, int32_t* out) {
  int32x4_t acc[NP][4];
  for (int j = 0; j < NP; ++j)
    for (int h = 0; h < 4; ++h) acc[j][h] = vdupq_n_s32(0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int32_t* o = off + 4 * b;
    int8x16_t x[NP][4];
    for (int j = 0; j < NP; ++j)
      for (int i = 0; i < 4; ++i) x[j][i] = quad_s8(a + j * ps + o[i]);
    for (int h = 0; h < 4; ++h) {
      int8x16_t w[4];
      unpack(panel + b * kBlockBytes + 16 * h, w);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NP; ++j) acc[j][h] = vdotq_s32(acc[j][h], w[i], x[j][i]);
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int h = 0; h < 4; ++h)
      vst1q_s32(out + j * kPanel + 4 * h, vmlaq_n_s32(acc[j][h], vld1q_s32(wsum + 4 * h), 128));
}
constexpr int kRun = 4;
#else
template <int NP>
void dot_np(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel,
            const int32_t* wsum, int32_t* out) {
  // acc[j][h][0]: channels 4h, 4h+1 as (e0+e1, e2+e3) pair sums; acc[j][h][1]: channels 4h+2, 4h+3.
  int32x4_t acc[NP][4][2];
  for (int j = 0; j < NP; ++j)
    for (int h = 0; h < 4; ++h) acc[j][h][0] = acc[j][h][1] = vdupq_n_s32(0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int32_t* o = off + 4 * b;
    for (int h = 0; h < 4; ++h) {
      int8x16_t w[4];
      unpack(panel + b * kBlockBytes + 16 * h, w);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < NP; ++j) {
          const int8x16_t x = quad_s8(a + j * ps + o[i]);
          acc[j][h][0] = vpadalq_s16(acc[j][h][0], vmull_s8(vget_low_s8(w[i]), vget_low_s8(x)));
          acc[j][h][1] = vpadalq_s16(acc[j][h][1], vmull_high_s8(w[i], x));
        }
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int h = 0; h < 4; ++h) {
      const int32x4_t s = vpaddq_s32(acc[j][h][0], acc[j][h][1]);
      vst1q_s32(out + j * kPanel + 4 * h, vmlaq_n_s32(s, vld1q_s32(wsum + 4 * h), 128));
    }
}
constexpr int kRun = 2;
#endif

void dot(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel,
         const int32_t* wsum, int np, int32_t* out) {
  for (int j0 = 0; j0 < np; j0 += kRun) {
    const uint8_t* aj = a + j0 * ps;
    int32_t* oj = out + j0 * kPanel;
    const int n = np - j0 < kRun ? np - j0 : kRun;
    if (n == 1) dot_np<1>(aj, ps, off, nblocks, panel, wsum, oj);
    else if (n == 2) dot_np<2>(aj, ps, off, nblocks, panel, wsum, oj);
#ifdef OCOMP_W2A8_DOTPROD
    else if (n == 3) dot_np<3>(aj, ps, off, nblocks, panel, wsum, oj);
    else dot_np<4>(aj, ps, off, nblocks, panel, wsum, oj);
#endif
  }
}

void depthwise_row(const uint8_t* rows, int64_t row_stride, const int8_t* w, int kH, int kW, int dh, int dw, int sw,
                   int64_t OW, int32_t* acc) {
  depthwise_row_impl(rows, row_stride, w, kH, kW, dh, dw, sw, OW, acc);
}

void quantize_row(const float* x, int64_t n, float inv_scale, int32_t zero_point, uint8_t* out) {
  quantize_row_impl(x, n, inv_scale, zero_point, out);
}

void epilogue(const int32_t* tile, int np, const int32_t* zc, const float* mul, const float* add, float lo, float hi,
              float* out) {
  epilogue_impl(tile, np, zc, mul, add, lo, hi, out);
}

void scale_row(const int32_t* acc, int64_t n, int32_t zc, float mul, float add, float lo, float hi, float* out) {
  scale_row_impl(acc, n, zc, mul, add, lo, hi, out);
}

}  // namespace

extern const W2A8Isa OCOMP_W2A8_ISA_VAR;
const W2A8Isa OCOMP_W2A8_ISA_VAR{OCOMP_W2A8_ISA_NAME, &dot, &depthwise_row, &quantize_row, &epilogue, &scale_row, nullptr};

}  // namespace ocomp
