// The NEON sdot path (-march=armv8.2-a+dotprod); see w2a8_neon.cc.
#define OCOMP_W2A8_DOTPROD 1
#include "w2a8_neon.cc"
