// AVX-512 VNNI path of the W2A8 sums (this file gets -mavx512f -mavx512bw
// -mavx512vl -mavx512vnni): a panel's 16 channels are the 16 int32 lanes of a
// zmm; each block of 64 packed bytes unpacks in registers (shift, and,
// vpshufb) into the s8 operands of four vpdpbusd, each reused by up to 8
// pixels whose 4 activation bytes are broadcast from memory.
#include <immintrin.h>

#include <cstring>

#include "w2a8.h"
#include "w2a8_portable.h"

namespace ocomp {
namespace {

inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int NP>
void dot_np(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel, int32_t* out) {
  // Few pixels: more independent accumulator chains (one per quad slot) to cover vpdpbusd latency.
  constexpr int NQ = NP == 1 ? 4 : NP <= 3 ? 2 : 1;
  __m512i acc[NP][NQ];
  for (int j = 0; j < NP; ++j)
    for (int s = 0; s < NQ; ++s) acc[j][s] = _mm512_setzero_si512();
  const __m512i m3 = _mm512_set1_epi8(0x03), mc = _mm512_set1_epi8(0x0C);
  // Code -> weight tables for vpshufb: lut0 indexed by the low bit pair (bytes 0, 1, -1, 0 repeated),
  // lut1 by the pair shifted left by 2 (entries 4 apart).
  const __m512i lut0 = _mm512_set1_epi32(0x00FF0100);
  const __m512i lut1 = _mm512_set4_epi32(0, -1, 0x01010101, 0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m512i v = _mm512_loadu_si512(panel + b * kBlockBytes);
    const __m512i v4 = _mm512_srli_epi16(v, 4);
    __m512i w[4];
    w[0] = _mm512_shuffle_epi8(lut0, _mm512_and_si512(v, m3));
    w[1] = _mm512_shuffle_epi8(lut1, _mm512_and_si512(v, mc));
    w[2] = _mm512_shuffle_epi8(lut0, _mm512_and_si512(v4, m3));
    w[3] = _mm512_shuffle_epi8(lut1, _mm512_and_si512(v4, mc));
    const int32_t* o = off + 4 * b;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const uint8_t* ai = a + o[i];
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j)
        acc[j][i % NQ] = _mm512_dpbusd_epi32(acc[j][i % NQ], _mm512_set1_epi32(load4(ai + j * ps)), w[i]);
    }
  }
  for (int j = 0; j < NP; ++j) {
    __m512i s = acc[j][0];
    for (int q = 1; q < NQ; ++q) s = _mm512_add_epi32(s, acc[j][q]);
    _mm512_storeu_si512(out + j * kPanel, s);
  }
}

void dot(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel, const int32_t*,
         int np, int32_t* out) {
  switch (np) {
    case 1: dot_np<1>(a, ps, off, nblocks, panel, out); break;
    case 2: dot_np<2>(a, ps, off, nblocks, panel, out); break;
    case 3: dot_np<3>(a, ps, off, nblocks, panel, out); break;
    case 4: dot_np<4>(a, ps, off, nblocks, panel, out); break;
    case 5: dot_np<5>(a, ps, off, nblocks, panel, out); break;
    case 6: dot_np<6>(a, ps, off, nblocks, panel, out); break;
    case 7: dot_np<7>(a, ps, off, nblocks, panel, out); break;
    default: dot_np<8>(a, ps, off, nblocks, panel, out); break;
  }
}

template <int NP>
void dot2_np(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel0,
             const uint8_t* panel1, int32_t* out0, int32_t* out1) {
  constexpr int NQ = NP <= 2 ? 2 : 1;
  __m512i acc0[NP][NQ], acc1[NP][NQ];
  for (int j = 0; j < NP; ++j)
    for (int s = 0; s < NQ; ++s) acc0[j][s] = acc1[j][s] = _mm512_setzero_si512();
  const __m512i m3 = _mm512_set1_epi8(0x03), mc = _mm512_set1_epi8(0x0C);
  const __m512i lut0 = _mm512_set1_epi32(0x00FF0100);
  const __m512i lut1 = _mm512_set4_epi32(0, -1, 0x01010101, 0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m512i v = _mm512_loadu_si512(panel0 + b * kBlockBytes);
    const __m512i u = _mm512_loadu_si512(panel1 + b * kBlockBytes);
    const __m512i v4 = _mm512_srli_epi16(v, 4), u4 = _mm512_srli_epi16(u, 4);
    const int32_t* o = off + 4 * b;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512i vi = i >= 2 ? v4 : v, ui = i >= 2 ? u4 : u;
      const __m512i mask = (i & 1) ? mc : m3, lut = (i & 1) ? lut1 : lut0;
      const __m512i w0 = _mm512_shuffle_epi8(lut, _mm512_and_si512(vi, mask));
      const __m512i w1 = _mm512_shuffle_epi8(lut, _mm512_and_si512(ui, mask));
      const uint8_t* ai = a + o[i];
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) {
        const __m512i x = _mm512_set1_epi32(load4(ai + j * ps));
        acc0[j][i % NQ] = _mm512_dpbusd_epi32(acc0[j][i % NQ], x, w0);
        acc1[j][i % NQ] = _mm512_dpbusd_epi32(acc1[j][i % NQ], x, w1);
      }
    }
  }
  for (int j = 0; j < NP; ++j) {
    __m512i s0 = acc0[j][0], s1 = acc1[j][0];
    for (int q = 1; q < NQ; ++q) {
      s0 = _mm512_add_epi32(s0, acc0[j][q]);
      s1 = _mm512_add_epi32(s1, acc1[j][q]);
    }
    _mm512_storeu_si512(out0 + j * kPanel, s0);
    _mm512_storeu_si512(out1 + j * kPanel, s1);
  }
}

void dot2(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel0,
          const uint8_t* panel1, int np, int32_t* out0, int32_t* out1) {
  switch (np) {
    case 1: dot2_np<1>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
    case 2: dot2_np<2>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
    case 3: dot2_np<3>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
    case 4: dot2_np<4>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
    case 5: dot2_np<5>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
    case 6: dot2_np<6>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
    case 7: dot2_np<7>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
    default: dot2_np<8>(a, ps, off, nblocks, panel0, panel1, out0, out1); break;
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

extern const W2A8Isa kW2A8Avx512Vnni;
const W2A8Isa kW2A8Avx512Vnni{"avx512vnni", &dot, &depthwise_row, &quantize_row, &epilogue, &scale_row, &dot2};

}  // namespace ocomp
