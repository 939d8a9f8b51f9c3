// The portable scalar reference of the W2A8 sums: every other path is tested
// against it bit-exactly (OCOMP_ISA=scalar forces it).
#include <cstring>

#include "w2a8.h"

namespace ocomp {
namespace {

inline int weight_of(uint8_t byte, int quad) {
  const int code = (byte >> (2 * quad)) & 0b11;
  return code == 0b01 ? 1 : code == 0b10 ? -1 : 0;
}

void dot(const uint8_t* a, int64_t pixel_stride, const int32_t* quad_offset, int64_t nblocks, const uint8_t* panel,
         const int32_t*, int np, int32_t* out) {
  for (int j = 0; j < np; ++j)
    for (int c = 0; c < kPanel; ++c) {
      int32_t sum = 0;
      for (int64_t b = 0; b < nblocks; ++b)
        for (int i = 0; i < 4; ++i) {
          const uint8_t* x = a + j * pixel_stride + quad_offset[4 * b + i];
          for (int e = 0; e < 4; ++e) sum += int32_t(x[e]) * weight_of(panel[b * kBlockBytes + c * 4 + e], i);
        }
      out[j * kPanel + c] = sum;
    }
}

void depthwise_row(const uint8_t* rows, int64_t row_stride, const int8_t* w, int kH, int kW, int dh, int dw, int sw,
                   int64_t OW, int32_t* acc) {
  for (int64_t ox = 0; ox < OW; ++ox) {
    int32_t s = 0;
    for (int ky = 0; ky < kH; ++ky)
      for (int kx = 0; kx < kW; ++kx)
        s += w[ky * kW + kx] * int32_t(rows[int64_t(ky) * dh * row_stride + ox * sw + int64_t(kx) * dw]);
    acc[ox] = s;
  }
}

void quantize_row(const float* x, int64_t n, float inv_scale, int32_t zero_point, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = quantize_one(x[i], inv_scale, zero_point);
}

void epilogue(const int32_t* tile, int np, const int32_t* zc, const float* mul, const float* add, float lo, float hi,
              float* out) {
  for (int j = 0; j < np; ++j)
    for (int c = 0; c < kPanel; ++c) {
      const float v = float(tile[j * kPanel + c] - zc[c]) * mul[c] + add[c];
      out[j * kPanel + c] = v < lo ? lo : (v > hi ? hi : v);
    }
}

void scale_row(const int32_t* acc, int64_t n, int32_t zc, float mul, float add, float lo, float hi, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = float(acc[i] - zc) * mul + add;
    out[i] = v < lo ? lo : (v > hi ? hi : v);
  }
}

}  // namespace

extern const W2A8Isa kW2A8Scalar;
const W2A8Isa kW2A8Scalar{"scalar", &dot, &depthwise_row, &quantize_row, &epilogue, &scale_row, nullptr};

}  // namespace ocomp
