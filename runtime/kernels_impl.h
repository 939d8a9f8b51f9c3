// Body of the accumulation kernel; included by kernels_generic.cc and
// kernels_avx2.cc with OCOMP_KERNEL_NS and OCOMP_KERNEL_VECTORS defined.
// GCC vector extensions: 8-float vectors become one ymm with -mavx2, two xmm
// on baseline x86-64, two q registers with NEON.
#include "kernels.h"

namespace ocomp {
namespace OCOMP_KERNEL_NS {
namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads

// T vectors of 8 floats per pass; T accumulators live in registers.
template <int T>
inline void run_lists(const float* __restrict x, const int32_t* __restrict offs, int nplus, int nminus,
                      float* __restrict out, bool first) {
  v8 acc[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) acc[t] = first ? v8{} : *reinterpret_cast<const v8*>(out + 8 * t);
  for (int i = 0; i < nplus; ++i) {
    const float* p = x + offs[i];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t] += *reinterpret_cast<const v8u*>(p + 8 * t);
  }
  offs += nplus;
  for (int i = 0; i < nminus; ++i) {
    const float* p = x + offs[i];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t] -= *reinterpret_cast<const v8u*>(p + 8 * t);
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) *reinterpret_cast<v8*>(out + 8 * t) = acc[t];
}

}  // namespace

void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first,
                int npix) {
  constexpr int kPass = 8 * OCOMP_KERNEL_VECTORS;
  static_assert(kTile % kPass == 0 && kPass <= 64, "tile must be a multiple of the pass width");
  for (int k = 0; k < nk; ++k) {
    const ListRef r = refs[k];
    float* out = partial + k * kTile;
    int p = 0;
#pragma GCC unroll 1
    for (; p + kPass <= npix; p += kPass)
      run_lists<OCOMP_KERNEL_VECTORS>(x + p, offsets + r.begin, r.nplus, r.nminus, out + p, first);
    // A short last tile: as many 8-wide vectors as it needs.
    const int* o = offsets + r.begin;
    switch ((npix - p) / 8) {
      case 0: break;
      case 1: run_lists<1>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 2: run_lists<2>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 3: run_lists<3>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 4: run_lists<4>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 5: run_lists<5>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 6: run_lists<6>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      default: run_lists<7>(x + p, o, r.nplus, r.nminus, out + p, first); break;
    }
  }
}

}  // namespace OCOMP_KERNEL_NS
}  // namespace ocomp
