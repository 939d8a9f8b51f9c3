// The 2-bit ternary weight codec, C++ side. The Python side is
// passes/ternary.py (pack_ternary/unpack_ternary); tests/test_codec.py holds
// the two to each other through the TernaryConv/TernaryGemm ops.
//
// Weights are flattened row-major in the op's canonical layout
// (TernaryConv: (K, C/group, kH, kW); TernaryGemm/TernaryMatMul: (N, Kin)).
// Weight i lives in byte i / 4 at bits 2*(i % 4) .. 2*(i % 4) + 1 (least
// significant pair first). Codes: 0b00 = 0, 0b01 = +1, 0b10 = -1, 0b11 invalid.
// The packed buffer holds exactly ceil(count / 4) bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ocomp {

constexpr uint8_t kCodeZero = 0b00;
constexpr uint8_t kCodePlus = 0b01;
constexpr uint8_t kCodeMinus = 0b10;
constexpr uint8_t kCodeInvalid = 0b11;

// Number of bytes that hold `count` 2-bit codes.
constexpr int64_t packed_size(int64_t count) { return (count + 3) / 4; }

// The 2-bit code of weight i.
inline uint8_t code_at(const uint8_t* packed, int64_t i) {
  return static_cast<uint8_t>((packed[i >> 2] >> (2 * (i & 3))) & 0b11);
}

// Decodes `count` weights into {-1, 0, +1}. `packed` must hold
// packed_size(count) bytes. Returns the index of the first invalid code
// (0b11), or -1 when every code is valid (then all of `out` is written).
inline int64_t unpack_ternary(const uint8_t* packed, int64_t count, int8_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t code = code_at(packed, i);
    if (code == kCodeInvalid) return i;
    out[i] = code == kCodePlus ? int8_t{1} : code == kCodeMinus ? int8_t{-1} : int8_t{0};
  }
  return -1;
}

}  // namespace ocomp
