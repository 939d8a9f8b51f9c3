// Baseline build of the accumulation kernel (SSE2 on x86-64, NEON on aarch64)
// and the run-time choice between it and the AVX2 build.
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
bool use_avx2() {
#if defined(OCOMP_HAVE_AVX2_KERNELS) && (defined(__x86_64__) || defined(__i386__))
  // OCOMP_KERNEL_ISA=generic forces the baseline (tests, comparisons).
  const char* force = std::getenv("OCOMP_KERNEL_ISA");
  if (force != nullptr && std::strcmp(force, "generic") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
}  // namespace

AccumulateFn accumulate_kernel() {
  static const AccumulateFn fn = use_avx2() ? &avx2::accumulate : &generic::accumulate;
  return fn;
}

const char* accumulate_isa() { return accumulate_kernel() == &generic::accumulate ? "generic" : "avx2"; }

}  // namespace ocomp

#if !defined(OCOMP_HAVE_AVX2_KERNELS)
// Non-x86 builds: the avx2 entry point exists only to satisfy the declaration.
namespace ocomp {
namespace avx2 {
void accumulate(const float* x, const int32_t* offsets, const ListRef* refs, int nk, float* partial, bool first,
                int npix) {
  generic::accumulate(x, offsets, refs, nk, partial, first, npix);
}
}  // namespace avx2
}  // namespace ocomp
#endif
