// The hot accumulation loop shared by TernaryConv and TernaryGemm/MatMul.
//
// Both ops are reduced to the same shape of work: an input buffer x laid out
// so that every reduction row r of an output o reads kTile consecutive floats
// at x + offset(r) (+ the tile start), and
//   partial[o][0..kTile) (+)= sum_{+1 rows} x[off..] - sum_{-1 rows} x[off..].
// Only adds and subtracts; alpha and bias are applied once per output later.
// Compiled three times on x86-64 (baseline SSE2, AVX2+FMA, AVX-512F; chosen at run time).
#pragma once

#include <cstdint>

namespace ocomp {

constexpr int kTile = 64;   // outputs pixels (or GEMM rows) per tile
constexpr int kChunk = 16;  // output channels per work item

// The nonzero rows of one output within one reduction block: offsets[begin ..
// begin + nplus) are added, the following nminus are subtracted.
struct ListRef {
  int32_t begin;
  int32_t nplus;
  int32_t nminus;
};

// partial (nk x kTile floats, 64-byte aligned) = (first ? 0 : partial) + lists,
// for the first npix (a multiple of 8, <= kTile; a last tile may be short)
// outputs of each row.
using AccumulateFn = void (*)(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial,
                              bool first, int npix);

namespace generic {
void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first, int npix);
}
namespace avx2 {
void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first, int npix);
}
namespace avx512 {
void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first, int npix);
}

// The best variant this CPU supports (decided once).
AccumulateFn accumulate_kernel();
const char* accumulate_isa();

}  // namespace ocomp
