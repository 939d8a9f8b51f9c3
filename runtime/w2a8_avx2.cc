// AVX2 path of the W2A8 sums (this file gets -mavx2 -mfma), for CPUs without
// int8 dot-product units: vpmaddubsw multiplies uint8 activations by the s8
// ternary weights and adds pairs into int16 (|pair| <= 510, so two quads'
// pairs are summed in int16 without saturation), vpmaddwd by ones widens to
// the int32 quad sums. A panel is two ymm of 8 int32 lanes.
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
  __m256i acc[NP][2];
  for (int j = 0; j < NP; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_si256();
  const __m256i m3 = _mm256_set1_epi8(0x03), mc = _mm256_set1_epi8(0x0C), ones = _mm256_set1_epi16(1);
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
      // Quads (0, 1) from the low bit pairs, (2, 3) from the high ones.
#pragma GCC unroll 2
      for (int pair = 0; pair < 2; ++pair) {
        const __m256i src = pair == 0 ? v : v4;
        const __m256i w0 = _mm256_shuffle_epi8(lut0, _mm256_and_si256(src, m3));
        const __m256i w1 = _mm256_shuffle_epi8(lut1, _mm256_and_si256(src, mc));
        const uint8_t* a0 = a + o[2 * pair];
        const uint8_t* a1 = a + o[2 * pair + 1];
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) {
          const __m256i p0 = _mm256_maddubs_epi16(_mm256_set1_epi32(load4(a0 + j * ps)), w0);
          const __m256i p1 = _mm256_maddubs_epi16(_mm256_set1_epi32(load4(a1 + j * ps)), w1);
          acc[j][h] = _mm256_add_epi32(acc[j][h], _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones));
        }
      }
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int h = 0; h < 2; ++h) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * kPanel + 8 * h), acc[j][h]);
}

void dot(const uint8_t* a, int64_t ps, const int32_t* off, int64_t nblocks, const uint8_t* panel, const int32_t*,
         int np, int32_t* out) {
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

extern const W2A8Isa kW2A8Avx2;
const W2A8Isa kW2A8Avx2{"avx2", &dot, &depthwise_row, &quantize_row, &epilogue, &scale_row, nullptr};

}  // namespace ocomp
