// Baseline build of the accumulation kernel (SSE2 on x86-64, NEON on aarch64)
// and the run-time choice between it and the AVX2 / AVX-512 builds.
#if defined(__aarch64__) || defined(__AVX__)
#define OCOMP_KERNEL_VECTORS 8  // 32 vector registers (NEON) or ymm (native builds)
#else
#define OCOMP_KERNEL_VECTORS 4  // 16 xmm registers: 4 x (2 xmm) accumulators
#endif
#define OCOMP_KERNEL_NS generic
#include "kernels_impl.h"

#include <cstdlib>
#include <cstring>

namespace ocomp {

namespace {
// The widest build this CPU runs; OCOMP_KERNEL_ISA=generic|avx2 caps it (tests, comparisons).
AccumulateFn choose() {
#if defined(OCOMP_HAVE_AVX2_KERNELS) && (defined(__x86_64__) || defined(__i386__))
  const char* force = std::getenv("OCOMP_KERNEL_ISA");
  if (force != nullptr && std::strcmp(force, "generic") == 0) return &generic::accumulate;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return &generic::accumulate;
  if (force != nullptr && std::strcmp(force, "avx2") == 0) return &avx2::accumulate;
  if (__builtin_cpu_supports("avx512f")) return &avx512::accumulate;
  return &avx2::accumulate;
#else
  return &generic::accumulate;
#endif
}
}  // namespace

AccumulateFn accumulate_kernel() {
  static const AccumulateFn fn = choose();
  return fn;
}

const char* accumulate_isa() {
  const AccumulateFn fn = accumulate_kernel();
  return fn == &generic::accumulate ? "generic" : fn == &avx2::accumulate ? "avx2" : "avx512";
}

}  // namespace ocomp

#if !defined(OCOMP_HAVE_AVX2_KERNELS)
// Non-x86 builds: the avx2/avx512 entry points exist only to satisfy the declarations.
namespace ocomp {
namespace avx2 {
void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first,
                int npix) {
  generic::accumulate(x, offsets, refs, nk, partial, first, npix);
}
}  // namespace avx2
namespace avx512 {
void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first,
                int npix) {
  generic::accumulate(x, offsets, refs, nk, partial, first, npix);
}
}  // namespace avx512
}  // namespace ocomp
#endif
