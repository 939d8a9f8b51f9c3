// AVX-512F build of the accumulation kernel (this file gets -mavx512f -mavx2 -mfma): 16-float zmm
// vectors, four a 64-pixel pass; chosen at run time on CPUs with AVX-512F.
#define OCOMP_KERNEL_NS avx512
#define OCOMP_KERNEL_LANES 16
#define OCOMP_KERNEL_VECTORS 4
#define OCOMP_KERNEL_SETS 2
#include "kernels_impl.h"
