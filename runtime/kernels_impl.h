// Body of the accumulation kernel; included by kernels_generic.cc,
// kernels_avx2.cc and kernels_avx512.cc with OCOMP_KERNEL_NS and
// OCOMP_KERNEL_VECTORS (and optionally OCOMP_KERNEL_LANES, default 8) defined.
// GCC vector extensions: 8-float vectors become one ymm with -mavx2, two xmm
// on baseline x86-64, two q registers with NEON; 16-float vectors one zmm
// with -mavx512f.
#include "kernels.h"

namespace ocomp {
namespace OCOMP_KERNEL_NS {
namespace {

#ifndef OCOMP_KERNEL_LANES
#define OCOMP_KERNEL_LANES 8
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float vw __attribute__((vector_size(4 * OCOMP_KERNEL_LANES)));

// An unaligned load (movups). Not a typedef with aligned(4): GCC drops attributes of template arguments.
template <typename V>
inline V loadu(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// T vectors of W floats (vector type V) per pass; T accumulators live in registers. With S = 2, even and
// odd rows go to two accumulator sets (summed at the end): twice the independent add chains, for CPUs whose
// add latency, not load or add throughput, bounds the loop (T zmm chains of one add a row otherwise).
#ifndef OCOMP_KERNEL_SETS
#define OCOMP_KERNEL_SETS 1
#endif

template <typename V, int W, int T, int S = 1>
inline void run_lists(const float* __restrict x, const int32_t* __restrict offs, int nplus, int nminus,
                      float* __restrict out, bool first) {
  V acc[T];
  V acc2[S == 2 ? T : 1];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) acc[t] = first ? V{} : *reinterpret_cast<const V*>(out + W * t);
  int i = 0;
  if constexpr (S == 2) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc2[t] = V{};
    for (; i + 1 < nplus; i += 2) {
      const float* p = x + offs[i];
      const float* q = x + offs[i + 1];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        acc[t] += loadu<V>(p + W * t);
        acc2[t] += loadu<V>(q + W * t);
      }
    }
  }
  for (; i < nplus; ++i) {
    const float* p = x + offs[i];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t] += loadu<V>(p + W * t);
  }
  offs += nplus;
  i = 0;
  if constexpr (S == 2) {
    for (; i + 1 < nminus; i += 2) {
      const float* p = x + offs[i];
      const float* q = x + offs[i + 1];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        acc[t] -= loadu<V>(p + W * t);
        acc2[t] -= loadu<V>(q + W * t);
      }
    }
  }
  for (; i < nminus; ++i) {
    const float* p = x + offs[i];
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t] -= loadu<V>(p + W * t);
  }
  if constexpr (S == 2) {
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t] += acc2[t];
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) *reinterpret_cast<V*>(out + W * t) = acc[t];
}

template <int T>
inline void run_lists8(const float* x, const int32_t* offs, int nplus, int nminus, float* out, bool first) {
  run_lists<v8, 8, T>(x, offs, nplus, nminus, out, first);
}

}  // namespace

void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first,
                int npix) {
  constexpr int kPass = OCOMP_KERNEL_LANES * OCOMP_KERNEL_VECTORS;
  static_assert(kTile % kPass == 0 && kPass <= 64, "tile must be a multiple of the pass width");
  for (int k = 0; k < nk; ++k) {
    const ListRef r = refs[k];
    float* out = partial + k * kTile;
    int p = 0;
#pragma GCC unroll 1
    for (; p + kPass <= npix; p += kPass)
      run_lists<vw, OCOMP_KERNEL_LANES, OCOMP_KERNEL_VECTORS, OCOMP_KERNEL_SETS>(x + p, offsets + r.begin, r.nplus, r.nminus,
                                                                 out + p, first);
    // A short last tile: as many 8-wide vectors as it needs.
    const int* o = offsets + r.begin;
    switch ((npix - p) / 8) {
      case 0: break;
      case 1: run_lists8<1>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 2: run_lists8<2>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 3: run_lists8<3>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 4: run_lists8<4>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 5: run_lists8<5>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      case 6: run_lists8<6>(x + p, o, r.nplus, r.nminus, out + p, first); break;
      default: run_lists8<7>(x + p, o, r.nplus, r.nminus, out + p, first); break;
    }
  }
}

}  // namespace OCOMP_KERNEL_NS
}  // namespace ocomp
