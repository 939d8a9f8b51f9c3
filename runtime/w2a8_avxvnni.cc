// 256-bit VNNI path of the W2A8 sums: a panel is two ymm of 8 int32 lanes.
// Built twice from this source: VEX-encoded AVX-VNNI (-mavxvnni, e.g. Alder
// Lake, Sapphire Rapids without AVX-512) and, through w2a8_avxvnni_evex.cc,
// EVEX-encoded with AVX-512VL+VNNI, which runs the same instructions' ymm
// forms on AVX-512 VNNI machines (so the path is testable there).
#include <immintrin.h>

#include <cstring>

#include "w2a8.h"
#include "w2a8_portable.h"

#ifdef OCOMP_W2A8_EVEX
#define OCOMP_DPBUSD256 _mm256_dpbusd_epi32
#define OCOMP_W2A8_ISA_NAME "avxvnni-evex"
#define OCOMP_W2A8_ISA_VAR kW2A8AvxVnniEvex
#else
#define OCOMP_DPBUSD256 _mm256_dpbusd_avx_epi32
#define OCOMP_W2A8_ISA_NAME "avxvnni"
#define OCOMP_W2A8_ISA_VAR kW2A8AvxVnni
#endif

namespace ocomp {
namespace {

inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int NP>
void dot_np(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel, int32_t* out) {
  constexpr int NQ = NP == 1 ? 2 : 1;
  __m256i acc[NP][NQ][2];
  for (int j = 0; j < NP; ++j)
    for (int s = 0; s < NQ; ++s) acc[j][s][0] = acc[j][s][1] = _mm256_setzero_si256();
  const __m256i m3 = _mm256_set1_epi8(0x03), mc = _mm256_set1_epi8(0x0C);
  const __m256i lut0 = _mm256_setr_epi8(0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0,
                                        0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0, 0, 1, -1, 0);
  const __m256i lut1 = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, 0, 0, 0, 0,
                                        0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, 0, 0, 0, 0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int32_t* o = off + 4 * b;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + b * kBlockBytes + 32 * h));
      const __m256i v4 = _mm256_srli_epi16(v, 4);
      __m256i w[4];
      w[0] = _mm256_shuffle_epi8(lut0, _mm256_and_si256(v, m3));
      w[1] = _mm256_shuffle_epi8(lut1, _mm256_and_si256(v, mc));
      w[2] = _mm256_shuffle_epi8(lut0, _mm256_and_si256(v4, m3));
      w[3] = _mm256_shuffle_epi8(lut1, _mm256_and_si256(v4, mc));
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const uint8_t* ai = a + o[i];
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j)
          acc[j][i % NQ][h] = OCOMP_DPBUSD256(acc[j][i % NQ][h], _mm256_set1_epi32(load4(ai + j * ps)), w[i]);
      }
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int h = 0; h < 2; ++h) {
      __m256i s = acc[j][0][h];
      for (int q = 1; q < NQ; ++q) s = _mm256_add_epi32(s, acc[j][q][h]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * kPanel + 8 * h), s);
    }
}

void dot(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel, const int32_t*,
         int np, int32_t* out) {
  // 16 ymm registers: runs of up to 4 pixels (8 accumulators, 4 weights, 4 constants).
  for (int j0 = 0; j0 < np; j0 += 4) {
    const uint8_t* aj = a + j0 * ps;
    int32_t* oj = out + j0 * kPanel;
    switch (np - j0) {
      case 1: dot_np<1>(aj, ps, off, nblocks, panel, oj); break;
      case 2: dot_np<2>(aj, ps, off, nblocks, panel, oj); break;
      case 3: dot_np<3>(aj, ps, off, nblocks, panel, oj); break;
      default: dot_np<4>(aj, ps, off, nblocks, panel, oj); break;
    }
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
