// The 256-bit VNNI path built with the EVEX encoding (AVX-512VL + AVX-512 VNNI); see w2a8_avxvnni.cc.
#define OCOMP_W2A8_EVEX 1
#include "w2a8_avxvnni.cc"
