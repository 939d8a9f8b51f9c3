// Parts of the W2A8 path written once in portable C++ and compiled into every
// ISA build, so GCC vectorizes them for that build's vector width: depthwise
// rows (integer adds), input quantization and the float epilogue (the same
// IEEE operations in the same order in every build, and -ffp-contract=off, so
// every build gives bit-identical results).
#pragma once

#include <cstdint>

#include "w2a8.h"

namespace ocomp {
namespace {

// Sums of up to 128 taps of uint8 fit int16 (|sum| <= 128 * 255): twice the lanes of int32 a vector.
inline void depthwise_row_i16(const uint8_t* rows, int64_t row_stride, const int8_t* w, int kH, int kW, int dh,
                              int dw, int sw, int64_t OW, int32_t* __restrict acc) {
  constexpr int64_t kChunk = 512;
  alignas(64) int16_t a16[kChunk];
  for (int64_t o0 = 0; o0 < OW; o0 += kChunk) {
    const int64_t n = OW - o0 < kChunk ? OW - o0 : kChunk;
    // Sums over a whole number of 32-lane blocks (no scalar remainder loops): the extra positions read at
    // most 31 * sw <= 62 bytes past the last needed one, inside the 64 bytes of slack every caller's plane
    // has, and are dropped.
    const int64_t nv = sw <= 2 ? (n + 31) / 32 * 32 : n;
    for (int64_t ox = 0; ox < nv; ++ox) a16[ox] = 0;
    for (int ky = 0; ky < kH; ++ky)
      for (int kx = 0; kx < kW; ++kx) {
        const int wt = w[ky * kW + kx];
        if (wt == 0) continue;
        const uint8_t* __restrict r = rows + int64_t(ky) * dh * row_stride + int64_t(kx) * dw + o0 * sw;
        if (sw == 1) {
          if (wt > 0)
            for (int64_t ox = 0; ox < nv; ++ox) a16[ox] = int16_t(a16[ox] + r[ox]);
          else
            for (int64_t ox = 0; ox < nv; ++ox) a16[ox] = int16_t(a16[ox] - r[ox]);
        } else if (sw == 2) {
          if (wt > 0)
            for (int64_t ox = 0; ox < nv; ++ox) a16[ox] = int16_t(a16[ox] + r[2 * ox]);
          else
            for (int64_t ox = 0; ox < nv; ++ox) a16[ox] = int16_t(a16[ox] - r[2 * ox]);
        } else {
          for (int64_t ox = 0; ox < nv; ++ox) a16[ox] = int16_t(a16[ox] + wt * r[ox * sw]);
        }
      }
    for (int64_t ox = 0; ox < n; ++ox) acc[o0 + ox] = a16[ox];
  }
}

inline void depthwise_row_impl(const uint8_t* rows, int64_t row_stride, const int8_t* w, int kH, int kW, int dh,
                               int dw, int sw, int64_t OW, int32_t* __restrict acc) {
  if (kH * kW <= 128) {
    depthwise_row_i16(rows, row_stride, w, kH, kW, dh, dw, sw, OW, acc);
    return;
  }
  for (int64_t ox = 0; ox < OW; ++ox) acc[ox] = 0;
  for (int ky = 0; ky < kH; ++ky)
    for (int kx = 0; kx < kW; ++kx) {
      const int wt = w[ky * kW + kx];
      if (wt == 0) continue;
      const uint8_t* __restrict r = rows + int64_t(ky) * dh * row_stride + int64_t(kx) * dw;
      if (sw == 1) {
        if (wt > 0)
          for (int64_t ox = 0; ox < OW; ++ox) acc[ox] += r[ox];
        else
          for (int64_t ox = 0; ox < OW; ++ox) acc[ox] -= r[ox];
      } else if (sw == 2) {
        if (wt > 0)
          for (int64_t ox = 0; ox < OW; ++ox) acc[ox] += r[2 * ox];
        else
          for (int64_t ox = 0; ox < OW; ++ox) acc[ox] -= r[2 * ox];
      } else {
        for (int64_t ox = 0; ox < OW; ++ox) acc[ox] += wt * r[ox * sw];
      }
    }
}

// Fixed-size blocks (fully vectorized for the build's width); the tail goes through a zero-padded block, so
// rows of any length (56, 28, 14, 7 pixels) are not left to a scalar remainder loop.
constexpr int64_t kQuantBlock = 32;

inline void quantize_block(const float* __restrict x, float inv_scale, int32_t zero_point, uint8_t* __restrict out) {
  for (int64_t i = 0; i < kQuantBlock; ++i) out[i] = quantize_one(x[i], inv_scale, zero_point);
}

inline void quantize_row_impl(const float* __restrict x, int64_t n, float inv_scale, int32_t zero_point,
                              uint8_t* __restrict out) {
  int64_t i = 0;
  for (; i + kQuantBlock <= n; i += kQuantBlock) quantize_block(x + i, inv_scale, zero_point, out + i);
  if (i < n) {
    alignas(64) float xs[kQuantBlock] = {};
    alignas(64) uint8_t q[kQuantBlock];
    for (int64_t j = 0; j < n - i; ++j) xs[j] = x[i + j];
    quantize_block(xs, inv_scale, zero_point, q);
    for (int64_t j = 0; j < n - i; ++j) out[i + j] = q[j];
  }
}

inline void scale_row_impl(const int32_t* __restrict acc, int64_t n, int32_t zc, float mul, float add, float lo,
                           float hi, float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    float v = float(acc[i] - zc) * mul + add;
    v = v < lo ? lo : v;
    out[i] = v > hi ? hi : v;
  }
}

inline void epilogue_impl(const int32_t* __restrict tile, int np, const int32_t* __restrict zc,
                          const float* __restrict mul, const float* __restrict add, float lo, float hi,
                          float* __restrict out) {
  for (int j = 0; j < np; ++j)
    for (int c = 0; c < kPanel; ++c) {
      float v = float(tile[j * kPanel + c] - zc[c]) * mul[c] + add[c];
      v = v < lo ? lo : v;
      out[j * kPanel + c] = v > hi ? hi : v;
    }
}

}  // namespace
}  // namespace ocomp
