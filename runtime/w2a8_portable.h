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

inline void depthwise_row_impl(const uint8_t* rows, int64_t row_stride, const int8_t* w, int kH, int kW, int dh,
                               int dw, int sw, int64_t OW, int32_t* __restrict acc) {
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

inline void quantize_row_impl(const float* __restrict x, int64_t n, float inv_scale, int32_t zero_point,
                              uint8_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = quantize_one(x[i], inv_scale, zero_point);
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
