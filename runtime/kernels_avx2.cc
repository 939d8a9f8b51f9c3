// AVX2+FMA build of the accumulation kernel (this file gets -mavx2 -mfma).
#define OCOMP_KERNEL_NS avx2
#define OCOMP_KERNEL_VECTORS 8
#include "kernels_impl.h"
