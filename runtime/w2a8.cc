// W2A8 drivers: path choice (CPUID / HWCAP), input quantization and layout,
// work split over onnxruntime's intra-op pool, epilogue. The per-ISA sums are
// in w2a8_<isa>.cc; everything here is shared by all paths, so they differ
// only in how the exact int32 sums are computed.
#include "w2a8_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace ocomp {

extern const W2A8Isa kW2A8Scalar;
#if defined(OCOMP_HAVE_AVX2_KERNELS)
extern const W2A8Isa kW2A8Avx512Vnni;
extern const W2A8Isa kW2A8AvxVnni;
extern const W2A8Isa kW2A8AvxVnniEvex;
extern const W2A8Isa kW2A8Avx2;
#endif
#if defined(OCOMP_HAVE_NEON_KERNELS)
extern const W2A8Isa kW2A8NeonDot;
extern const W2A8Isa kW2A8Neon;
#endif

namespace {

#if defined(OCOMP_HAVE_AVX2_KERNELS)
struct X86Features {
  bool avx2 = false, avx512 = false, avx512vnni = false, avxvnni = false;
};

X86Features x86_features() {
  X86Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const bool ymm_state = (xlo & 0x6) == 0x6, zmm_state = (xlo & 0xE6) == 0xE6;
  if (!ymm_state || __get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = (b & (1u << 5)) != 0;
  const bool avx512f = b & (1u << 16), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx512 = zmm_state && avx512f && avx512bw && avx512vl;
  f.avx512vnni = f.avx512 && (c & (1u << 11));
  const unsigned max_sub = a;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avxvnni = f.avx2 && (a & (1u << 4));
  }
  return f;
}
#endif

std::vector<IsaEntry> paths() {
  std::vector<IsaEntry> out;
#if defined(OCOMP_HAVE_AVX2_KERNELS)
  const X86Features f = x86_features();
  out.push_back({&kW2A8Avx512Vnni, f.avx512vnni});
  out.push_back({&kW2A8AvxVnni, f.avxvnni});
  out.push_back({&kW2A8AvxVnniEvex, f.avx512vnni});
  out.push_back({&kW2A8Avx2, f.avx2});
#endif
#if defined(OCOMP_HAVE_NEON_KERNELS)
#if defined(__linux__)
  const bool dotprod = (getauxval(AT_HWCAP) & (1ul << 20)) != 0;  // HWCAP_ASIMDDP
#else
  const bool dotprod = false;
#endif
  out.push_back({&kW2A8NeonDot, dotprod});
  out.push_back({&kW2A8Neon, true});
#endif
  out.push_back({&kW2A8Scalar, true});
  return out;
}

struct Choice {
  const W2A8Isa* isa = nullptr;
  std::string error;
};

Choice choose() {
  Choice choice;
  const std::vector<IsaEntry> all = paths();
  const char* force = std::getenv("OCOMP_ISA");
  if (force == nullptr || *force == '\0') {
    for (const IsaEntry& e : all)
      if (e.supported) {
        choice.isa = e.isa;
        break;
      }
    return choice;
  }
  std::string names;
  for (const IsaEntry& e : all) {
    names += std::string(names.empty() ? "" : ", ") + e.isa->name;
    if (std::strcmp(e.isa->name, force) == 0) {
      if (e.supported)
        choice.isa = e.isa;
      else
        choice.error = std::string("OCOMP_ISA=") + force + ": this CPU does not support that path";
      return choice;
    }
  }
  choice.error = std::string("OCOMP_ISA=") + force + " is not a path of this build (compiled paths: " + names + ")";
  return choice;
}

constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t round4(int64_t v) { return (v + 3) / 4 * 4; }

// Enough work items for the intra-op threads to balance.
constexpr int64_t kMinItems = 32;

// Per-channel epilogue constants of one panel (padding channels: all zero).
struct PanelEpilogue {
  alignas(64) int32_t zc[kPanel];
  alignas(64) float mul[kPanel];
  alignas(64) float add[kPanel];
  void set(const int32_t* wsum, int32_t z, const float* m, const float* bias, int64_t nk) {
    for (int64_t c = 0; c < kPanel; ++c) {
      const bool real = c < nk;
      zc[c] = real ? z * wsum[c] : 0;
      mul[c] = real ? m[c] : 0.0f;
      add[c] = real && bias ? bias[c] : 0.0f;
    }
  }
};

// The most groups `panels` may be split into: pairs when the path has dot2.
inline int64_t dot2_groups(const W2A8Isa* isa, int64_t panels) { return isa->dot2 != nullptr ? panels / 2 : panels; }

uint8_t* byte_scratch(size_t bytes) { return reinterpret_cast<uint8_t*>(thread_scratch(bytes / 4 + 16)); }

// dst[w * dst_stride + c] = src[c * src_stride + w] for channels c < nc (<= 16) and w < n, and
// dst[w * dst_stride + c] = pad for nc <= c < 16 (a byte transpose; SSE2 16x16 blocks where available, the
// baseline of every x86-64 build). Each of the nc source rows must be readable 16 bytes past w = n - 1
// rounded down to 16 (a short tail is transposed as a whole block, of which only the first n % 16 rows are
// stored). Pixel w's 16 bytes are stored at once while w < nwide (they may run into pixel w + 1, which is
// stored after it, or into later channels that the caller writes afterwards), the rest byte by byte up to
// channel `width` (nc <= width <= 16: the pad bytes of the pixel's own slots).
void transpose16(const uint8_t* src, int64_t src_stride, int64_t n, uint8_t* dst, int64_t dst_stride, int nc,
                 uint8_t pad, int64_t nwide, int width) {
  int64_t w = 0;
#if defined(__SSE2__)
  const __m128i padv = _mm_set1_epi8(static_cast<char>(pad));
  for (; w < n; w += 16) {
    const int64_t rows = n - w < 16 ? n - w : 16;
    __m128i r[16], b[16], c[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < nc ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * src_stride + w)) : padv;
    for (int k = 0; k < 8; ++k) {
      b[k] = _mm_unpacklo_epi8(r[2 * k], r[2 * k + 1]);      // w 0..7, channels 2k, 2k+1
      b[k + 8] = _mm_unpackhi_epi8(r[2 * k], r[2 * k + 1]);  // w 8..15
    }
    for (int k = 0; k < 4; ++k) {
      c[k] = _mm_unpacklo_epi16(b[2 * k], b[2 * k + 1]);  // w 0..3, channels 4k..4k+3
      c[k + 4] = _mm_unpackhi_epi16(b[2 * k], b[2 * k + 1]);
      c[k + 8] = _mm_unpacklo_epi16(b[2 * k + 8], b[2 * k + 9]);
      c[k + 12] = _mm_unpackhi_epi16(b[2 * k + 8], b[2 * k + 9]);
    }
    __m128i out[16];
    for (int g = 0; g < 16; g += 4) {
      const __m128i d0 = _mm_unpacklo_epi32(c[g], c[g + 1]), d1 = _mm_unpackhi_epi32(c[g], c[g + 1]);
      const __m128i d2 = _mm_unpacklo_epi32(c[g + 2], c[g + 3]), d3 = _mm_unpackhi_epi32(c[g + 2], c[g + 3]);
      out[g] = _mm_unpacklo_epi64(d0, d2);
      out[g + 1] = _mm_unpackhi_epi64(d0, d2);
      out[g + 2] = _mm_unpacklo_epi64(d1, d3);
      out[g + 3] = _mm_unpackhi_epi64(d1, d3);
    }
    for (int64_t i = 0; i < rows; ++i) {
      if (w + i < nwide) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (w + i) * dst_stride), out[i]);
      } else {
        alignas(16) uint8_t tmp[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), out[i]);
        std::memcpy(dst + (w + i) * dst_stride, tmp, static_cast<size_t>(width));
      }
    }
  }
#endif
  for (; w < n; ++w) {
    for (int c = 0; c < nc; ++c) dst[w * dst_stride + c] = src[c * src_stride + w];
    for (int c = nc; c < width; ++c) dst[w * dst_stride + c] = pad;
  }
}

// dst[c * stride + j] = tile[j * kPanel + c] for pixels j < np and channels c < nk (a run's epilogue output,
// pixel-major, written to NCHW planes): SSE 4 x 4 float transposes over whole groups of 4 pixels, the
// channels beyond nk not stored; the last np % 4 pixels one by one.
void store_channels(const float* tile, int np, int64_t nk, float* dst, int64_t stride) {
  int j0 = 0;
#if defined(__SSE2__)
  if (nk == kPanel) {
    for (; j0 + 4 <= np; j0 += 4)
      for (int64_t c0 = 0; c0 < kPanel; c0 += 4) {
        __m128 r0 = _mm_loadu_ps(tile + (j0 + 0) * kPanel + c0), r1 = _mm_loadu_ps(tile + (j0 + 1) * kPanel + c0);
        __m128 r2 = _mm_loadu_ps(tile + (j0 + 2) * kPanel + c0), r3 = _mm_loadu_ps(tile + (j0 + 3) * kPanel + c0);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        _mm_storeu_ps(dst + (c0 + 0) * stride + j0, r0);
        _mm_storeu_ps(dst + (c0 + 1) * stride + j0, r1);
        _mm_storeu_ps(dst + (c0 + 2) * stride + j0, r2);
        _mm_storeu_ps(dst + (c0 + 3) * stride + j0, r3);
      }
  }
  for (; j0 + 4 <= np; j0 += 4)
    for (int64_t c0 = 0; c0 < nk; c0 += 4) {
      __m128 r0 = _mm_loadu_ps(tile + (j0 + 0) * kPanel + c0), r1 = _mm_loadu_ps(tile + (j0 + 1) * kPanel + c0);
      __m128 r2 = _mm_loadu_ps(tile + (j0 + 2) * kPanel + c0), r3 = _mm_loadu_ps(tile + (j0 + 3) * kPanel + c0);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      const int64_t left = nk - c0;
      _mm_storeu_ps(dst + (c0 + 0) * stride + j0, r0);
      if (left > 1) _mm_storeu_ps(dst + (c0 + 1) * stride + j0, r1);
      if (left > 2) _mm_storeu_ps(dst + (c0 + 2) * stride + j0, r2);
      if (left > 3) _mm_storeu_ps(dst + (c0 + 3) * stride + j0, r3);
    }
#endif
  for (int64_t c = 0; c < nk; ++c)
    for (int j = j0; j < np; ++j) dst[c * stride + j] = tile[j * kPanel + c];
}

// store_channels with a fused residual Add: dst[c * stride + j] = clamp_out(tile[j * kPanel + c] +
// r[c * stride + j], lo, hi) (r: the residual at the same place as dst).
void store_channels_residual(const float* tile, int np, int64_t nk, const float* r, float lo, float hi, float* dst,
                             int64_t stride) {
  int j0 = 0;
#if defined(__SSE2__)
  // max(lo, v) and min(hi, v) return v when it is NaN: clamp_out exactly.
  const __m128 lov = _mm_set1_ps(lo), hiv = _mm_set1_ps(hi);
  auto put = [&](int64_t c, __m128 v) {
    v = _mm_add_ps(v, _mm_loadu_ps(r + c * stride + j0));
    _mm_storeu_ps(dst + c * stride + j0, _mm_min_ps(hiv, _mm_max_ps(lov, v)));
  };
  for (; j0 + 4 <= np; j0 += 4)
    for (int64_t c0 = 0; c0 < nk; c0 += 4) {
      __m128 r0 = _mm_loadu_ps(tile + (j0 + 0) * kPanel + c0), r1 = _mm_loadu_ps(tile + (j0 + 1) * kPanel + c0);
      __m128 r2 = _mm_loadu_ps(tile + (j0 + 2) * kPanel + c0), r3 = _mm_loadu_ps(tile + (j0 + 3) * kPanel + c0);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      const int64_t left = nk - c0;
      put(c0, r0);
      if (left > 1) put(c0 + 1, r1);
      if (left > 2) put(c0 + 2, r2);
      if (left > 3) put(c0 + 3, r3);
    }
#endif
  for (int64_t c = 0; c < nk; ++c)
    for (int j = j0; j < np; ++j) dst[c * stride + j] = clamp_out(tile[j * kPanel + c] + r[c * stride + j], lo, hi);
}

// The residual Add of a tile kept pixel-major (for codes): out[j * kPanel + c] = clamp_out(tile[j * kPanel + c] +
// r[c * stride + j], lo, hi) for pixels j < np and channels c < nk, exactly as store_channels_residual
// computes it; channels nk..15 of out: clamp_out(tile[...] + 0). SSE: the residual's 4 x 4 blocks
// transposed in registers; the rest one by one.
void add_residual_tile(const float* tile, int np, int64_t nk, const float* r, int64_t stride, float lo, float hi,
                       float* out) {
  for (int j = 0; j < np; ++j)
    for (int64_t c = nk; c < kPanel; ++c) out[j * kPanel + c] = clamp_out(tile[j * kPanel + c] + 0.0f, lo, hi);
  int j0 = 0;
  const int64_t nk4 = nk / 4 * 4;
#if defined(__SSE2__)
  const __m128 lov = _mm_set1_ps(lo), hiv = _mm_set1_ps(hi);
  auto put = [&](int j, int64_t c0, __m128 v) {
    v = _mm_add_ps(_mm_loadu_ps(tile + j * kPanel + c0), v);
    _mm_storeu_ps(out + j * kPanel + c0, _mm_min_ps(hiv, _mm_max_ps(lov, v)));
  };
  for (; j0 + 4 <= np; j0 += 4) {
    for (int64_t c0 = 0; c0 < nk4; c0 += 4) {
      __m128 r0 = _mm_loadu_ps(r + (c0 + 0) * stride + j0), r1 = _mm_loadu_ps(r + (c0 + 1) * stride + j0);
      __m128 r2 = _mm_loadu_ps(r + (c0 + 2) * stride + j0), r3 = _mm_loadu_ps(r + (c0 + 3) * stride + j0);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      put(j0 + 0, c0, r0);
      put(j0 + 1, c0, r1);
      put(j0 + 2, c0, r2);
      put(j0 + 3, c0, r3);
    }
    for (int64_t c = nk4; c < nk; ++c)
      for (int j = j0; j < j0 + 4; ++j) out[j * kPanel + c] = clamp_out(tile[j * kPanel + c] + r[c * stride + j], lo, hi);
  }
#endif
  for (int64_t c = 0; c < nk; ++c)
    for (int j = j0; j < np; ++j) out[j * kPanel + c] = clamp_out(tile[j * kPanel + c] + r[c * stride + j], lo, hi);
}

// The whole input x (`total` floats) quantized at once in its own order: long contiguous runs, where small
// rows would spend their time in the per-row remainder blocks. `slack` bytes after it stay readable.
const uint8_t* quantize_all(OrtKernelContext* context, QuantizeRowFn quantize_row, const float* x, int64_t total,
                            float inv, int32_t z, int64_t slack) {
  thread_local std::vector<uint8_t> quantized;
  quantized.resize(static_cast<size_t>(total + slack));
  uint8_t* qx = quantized.data();
  constexpr int64_t kQuantChunk = 16384;
  auto quantize = [&](size_t item) {
    const int64_t i0 = int64_t(item) * kQuantChunk;
    quantize_row(x + i0, std::min(kQuantChunk, total - i0), inv, z, qx + i0);
  };
  parallel_for(context, static_cast<size_t>((total + kQuantChunk - 1) / kQuantChunk), quantize);
  return qx;
}

}  // namespace

std::vector<IsaEntry> w2a8_paths() { return paths(); }

const W2A8Isa& w2a8_isa() {
  static const Choice choice = choose();
  if (choice.isa == nullptr) throw Error(choice.error);
  return *choice.isa;
}

void add_residual(float* y, const float* r, int64_t n, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) y[i] = clamp_out(y[i] + r[i], lo, hi);
}

ActQuant dynamic_quant(float lo, float hi) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  if (!std::isfinite(lo) || !std::isfinite(hi))
    throw Error("dynamic activation quantization: the input has infinite values");
  ActQuant q;
  if (!(hi > lo)) return q;  // all zeros
  q.scale = (hi - lo) / 255.0f;
  const float z = std::nearbyint(-lo / q.scale);
  q.zero_point = static_cast<int32_t>(std::min(255.0f, std::max(0.0f, z)));
  return q;
}

namespace {

bool attr_float(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* value) {
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, value);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return false;
  }
  return true;
}

bool attr_string(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string* value) {
  size_t len = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &len);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return false;
  }
  std::string s(len, '\0');
  Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, name, &s[0], &len));
  s.resize(std::strlen(s.c_str()));
  *value = s;
  return true;
}

}  // namespace

ChainAttrs read_chain_attrs(const OrtApi& api, const OrtKernelInfo* info, const char* op) {
  ChainAttrs c;
  auto layout = [&](const char* name) {
    std::string v;
    if (!attr_string(api, info, name, &v) || v.empty()) return false;
    if (v != kCodesLayout)
      throw Error(std::string(op) + ": " + name + " must be \"" + kCodesLayout + "\", got \"" + v + "\"");
    return true;
  };
  c.codes_in = layout("input_layout");
  c.codes_out = layout("output_layout");
  float scale = 0.0f;
  const bool has_scale = attr_float(api, info, "output_scale", &scale);
  int64_t zp = 0;
  const bool has_zp = attr_int(api, info, "output_zero_point", &zp);
  if (!c.codes_out) {
    if (has_scale || has_zp) throw Error(std::string(op) + ": output_scale / output_zero_point need output_layout");
    return c;
  }
  if (!has_scale) throw Error(std::string(op) + ": output_layout needs output_scale");
  if (!(scale > 0.0f) || !std::isfinite(scale))
    throw Error(std::string(op) + ": output_scale must be a finite number > 0, got " + std::to_string(scale));
  if (zp < 0 || zp > 255)
    throw Error(std::string(op) + ": output_zero_point must be in [0, 255] (uint8), got " + std::to_string(zp));
  c.out.scale = scale;
  c.out.zero_point = static_cast<int32_t>(zp);
  return c;
}

ActAttrs read_act_attrs(const OrtApi& api, const OrtKernelInfo* info, const char* op) {
  ActAttrs a;
  auto get_float = [&](const char* name, float* value) { return attr_float(api, info, name, value); };
  auto get_string = [&](const char* name, std::string* value) { return attr_string(api, info, name, value); };
  std::string mode;
  const bool has_mode = get_string("act_quant", &mode);
  float scale = 0.0f;
  const bool has_scale = get_float("act_scale", &scale);
  int64_t zp = 0;
  const bool has_zp = attr_int(api, info, "act_zero_point", &zp);
  if (has_mode && mode == "dynamic") {
    if (has_scale || has_zp)
      throw Error(std::string(op) + ": act_quant=dynamic takes no act_scale / act_zero_point");
    a.mode = ActAttrs::kDynamic;
  } else if ((has_mode && mode == "static") || (!has_mode && has_scale)) {
    if (!has_scale) throw Error(std::string(op) + ": act_quant=static needs act_scale");
    if (!(scale > 0.0f) || !std::isfinite(scale))
      throw Error(std::string(op) + ": act_scale must be a finite number > 0, got " + std::to_string(scale));
    if (zp < 0 || zp > 255)
      throw Error(std::string(op) + ": act_zero_point must be in [0, 255] (uint8), got " + std::to_string(zp));
    a.mode = ActAttrs::kStatic;
    a.quant.scale = scale;
    a.quant.zero_point = static_cast<int32_t>(zp);
  } else if (has_mode && !mode.empty()) {
    throw Error(std::string(op) + ": act_quant must be \"static\" or \"dynamic\", got \"" + mode + "\"");
  } else if (has_zp) {
    throw Error(std::string(op) + ": act_zero_point given without act_scale");
  }
  std::string activation;
  if (get_string("activation", &activation) && !activation.empty()) {
    if (activation == "Relu") {
      a.lo = 0.0f;
    } else if (activation == "Clip") {
      float v;
      if (get_float("clip_min", &v)) a.lo = v;
      if (get_float("clip_max", &v)) a.hi = v;
      if (!(a.lo <= a.hi))
        throw Error(std::string(op) + ": clip_min must be <= clip_max");
    } else {
      throw Error(std::string(op) + ": activation must be \"Relu\" or \"Clip\", got \"" + activation + "\"");
    }
  }
  return a;
}

ActQuant run_quant(const ActAttrs& act, OrtKernelContext*, const float* x, int64_t count) {
  if (act.mode == ActAttrs::kStatic) return act.quant;
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  return dynamic_quant(lo, hi);
}

std::vector<int8_t> dense_weights(const SparseTernary& w) {
  std::vector<int8_t> d(static_cast<size_t>(w.outputs * w.rows), 0);
  for (int64_t o = 0; o < w.outputs; ++o)
    for (int64_t i = w.start[o]; i < w.start[o + 1]; ++i)
      d[o * w.rows + w.index[i]] = i - w.start[o] < w.nplus[o] ? 1 : -1;
  return d;
}

// ------------------------------------------------------------------ conv

W2A8Conv::W2A8Conv(const W2A8ConvShape& s, const int8_t* dense) : s_(s), isa_(&w2a8_isa()) {
  const int64_t taps = s.kH * s.kW, Kg = s.K / s.group;
  depthwise_ = s.Cg == 1;
  if (depthwise_) {
    dw_weights_.assign(dense, dense + s.K * taps);
    dw_wsum_.resize(static_cast<size_t>(s.K));
    for (int64_t k = 0; k < s.K; ++k) {
      int32_t sum = 0;
      for (int64_t t = 0; t < taps; ++t) sum += dense[k * taps + t];
      dw_wsum_[k] = sum;
    }
    return;
  }
  Cp_ = round4(s.Cg);
  const int64_t cq = Cp_ / 4;
  for (int64_t g = 0; g < s.group; ++g)
    groups_.push_back(pack_w2a8(Kg, taps * cq, [&](int64_t k, int64_t q, int e) -> int {
      const int64_t t = q / cq, c = (q % cq) * 4 + e;
      return c < s.Cg ? dense[((g * Kg + k) * s.Cg + c) * taps + t] : 0;
    }));
}

void W2A8Conv::run(OrtKernelContext* context, const float* x, int64_t N, int64_t H, int64_t W, int64_t OH,
                   int64_t OW, const ActQuant& q, const float* alpha, const float* bias, float lo, float hi,
                   const float* residual, float* y, const uint8_t* xq, uint8_t* yq, ActQuant yquant) const {
  const W2A8ConvShape& s = s_;
  // Per-call scratch kept per calling thread (no heap allocation once warm).
  // (Lambdas run on pool threads: they see the caller's vectors through the local references.)
  thread_local std::vector<float> mul_tls;
  std::vector<float>& mul = mul_tls;
  mul.resize(static_cast<size_t>(s.K));
  for (int64_t k = 0; k < s.K; ++k) mul[k] = alpha[k] * q.scale;
  if ((xq != nullptr || yq != nullptr) && (depthwise_ || (xq != nullptr && s.group != 1)))
    throw Error("TernaryConv: uint8 code input/output needs C/group > 1 (and group 1 for the input)");
  if (depthwise_) {
    run_depthwise(context, x, N, H, W, OH, OW, q, mul.data(), bias, lo, hi, residual, y);
    return;
  }
  const int64_t G = s.group, Cg = s.Cg, C = Cg * G, Kg = s.K / G, Cp = Cp_;
  const int64_t Hp = H + s.pt + s.pb, Wp = W + s.pl + s.pr;
  const int64_t block = Hp * Wp * Cp + 64;
  if (double(N) * G * block > double(INT64_MAX / 8)) throw Error("TernaryConv: input too large");
  uint8_t* buf = byte_scratch(static_cast<size_t>(N * G * block));
  const float inv = 1.0f / q.scale;
  const int32_t z = q.zero_point;
  const uint8_t zb = static_cast<uint8_t>(z);
  const QuantizeRowFn quantize_row = isa_->quantize_row;

  // 0. The whole input quantized at once, in NCHW order (transpose16 reads up to 15 bytes past a row);
  // chained: the codes are given, pixel-major with the channels padded as here (group 1).
  const uint8_t* qx = xq != nullptr ? nullptr : quantize_all(context, quantize_row, x, N * C * H * W, inv, z, 16);

  // Padded rows some output reads (a strided conv with a kernel shorter than its stride skips rows; the
  // buffer's other rows are never read and stay unwritten).
  thread_local std::vector<char> needed_tls;
  std::vector<char>& needed = needed_tls;
  needed.assign(static_cast<size_t>(Hp), 0);
  for (int64_t oy = 0; oy < OH; ++oy)
    for (int64_t ky = 0; ky < s.kH; ++ky) needed[static_cast<size_t>(oy * s.sh + ky * s.dh)] = 1;

  // 1. Quantized, zero-point padded NHWC rows (channels padded to quads), one item per padded row.
  auto fill = [&](size_t item) {
    const int64_t hp = int64_t(item) % Hp, ng = int64_t(item) / Hp;
    if (!needed[static_cast<size_t>(hp)]) return;
    const int64_t n = ng / G, g = ng % G, h = hp - s.pt;
    uint8_t* row = buf + ng * block + hp * Wp * Cp;
    if (h < 0 || h >= H) {
      std::memset(row, zb, static_cast<size_t>(Wp * Cp));
      return;
    }
    std::memset(row, zb, static_cast<size_t>(s.pl * Cp));
    std::memset(row + (s.pl + W) * Cp, zb, static_cast<size_t>(s.pr * Cp));
    if (xq != nullptr) {  // chained: the row as it is (G == 1)
      std::memcpy(row + s.pl * Cp, xq + (n * H + h) * W * Cp, static_cast<size_t>(W * Cp));
      return;
    }
    // Interleave the channels of the quantized NCHW input: 16 at a time by a byte transpose. The last,
    // partial block (with the quad padding channels Cg..Cp-1 as zero points) goes first: its wide stores
    // run into the next pixel's first channels, which the full blocks then write. A pixel's wide store
    // stays inside this padded row (the right padding is zero points as well).
    const uint8_t* src = qx + ((n * C + g * Cg) * H + h) * W;
    uint8_t* dst = row + s.pl * Cp;
    const int64_t row_left = (Wp - s.pl) * Cp;  // bytes from dst to the end of the padded row
    const int64_t full = Cg / 16 * 16;
    if (full < Cg) {
      const int64_t nwide = row_left < full + 16 ? 0 : std::min<int64_t>(W, (row_left - full - 16) / Cp + 1);
      transpose16(src + full * H * W, H * W, W, dst + full, Cp, static_cast<int>(Cg - full), zb, nwide,
                  static_cast<int>(Cp - full));
    }
    for (int64_t c0 = 0; c0 < full; c0 += 16) transpose16(src + c0 * H * W, H * W, W, dst + c0, Cp, 16, zb, W, 16);
  };
  parallel_for(context, static_cast<size_t>(N * G * Hp), fill);

  const W2A8Weights& w0 = groups_[0];
  thread_local std::vector<int32_t> off_tls;
  std::vector<int32_t>& off = off_tls;
  off.assign(static_cast<size_t>(w0.nblocks * 4), 0);
  const int64_t cq = Cp / 4;
  for (int64_t ky = 0; ky < s.kH; ++ky)
    for (int64_t kx = 0; kx < s.kW; ++kx)
      for (int64_t c4 = 0; c4 < cq; ++c4)
        off[(ky * s.kW + kx) * cq + c4] = static_cast<int32_t>((ky * s.dh * Wp + kx * s.dw) * Cp + 4 * c4);
  if ((s.dh * (s.kH - 1) * Wp + s.dw * (s.kW - 1) + 1) * Cp > INT32_MAX) throw Error("TernaryConv: input too large");

  // 2. Items: (image, group, output row, group of panels).
  const int64_t rows = N * G * OH;
  // Panels split into groups for balance, but a group keeps two panels when there are two (dot2 halves the
  // activation loads: splitting a pair for balance cost more than it gained on 7x7 and 14x14 layers).
  const int64_t pgroups = std::min(std::max<int64_t>(1, dot2_groups(isa_, w0.panels)),
                                   std::max<int64_t>(1, (kMinItems + rows - 1) / rows));
  const int64_t per_item = (w0.panels + pgroups - 1) / pgroups;
  const DotFn dot = isa_->dot;
  const Dot2Fn dot2 = isa_->dot2;
  const EpilogueFn epilogue = isa_->epilogue;
  const int64_t ps = s.sw * Cp;
  // Every panel's epilogue constants, once per call (not once per work item).
  thread_local std::vector<PanelEpilogue> epi_tls;
  std::vector<PanelEpilogue>& epi = epi_tls;
  epi.resize(static_cast<size_t>(G * w0.panels));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t p = 0; p < w0.panels; ++p) {
      const int64_t nk = std::min<int64_t>(kPanel, Kg - p * kPanel);
      epi[g * w0.panels + p].set(groups_[g].wsum.data() + p * kPanel, z, mul.data() + g * Kg + p * kPanel,
                                 bias ? bias + g * Kg + p * kPanel : nullptr, nk);
    }
  // Chained output: codes [N, OH, OW, Ko] (Ko = round4(K)), quantized as the consumer's quantize_row would.
  const int64_t Ko = round4(s.K);
  const float yinv = 1.0f / yquant.scale;
  const int32_t yz = yquant.zero_point;
  auto work = [&](size_t item) {
    const int64_t pg = int64_t(item) % pgroups, r = int64_t(item) / pgroups;
    const int64_t oy = r % OH, ng = r / OH, n = ng / G, g = ng % G;
    const W2A8Weights& wg = groups_[g];
    const uint8_t* arow = buf + ng * block + oy * s.sh * Wp * Cp;
    alignas(64) int32_t tile[kMaxRun * kPanel];
    alignas(64) float ftile[kMaxRun * kPanel];
    alignas(64) int32_t tile2[kMaxRun * kPanel];
    alignas(64) uint8_t qtile[kMaxRun * kPanel];
    alignas(64) float rtile[kMaxRun * kPanel];
    const int64_t p_end = std::min(wg.panels, (pg + 1) * per_item);
    auto store = [&](const int32_t* t, const PanelEpilogue& pe, int64_t p, int64_t ox0, int np) {
      const int64_t nk = std::min<int64_t>(kPanel, Kg - p * kPanel);
      const int64_t at = ((n * s.K + g * Kg + p * kPanel) * OH + oy) * OW + ox0;
      if (yq != nullptr) {
        // The output values, pixel-major (with the residual added and clamped as store_channels_residual
        // does), quantized for the reader; also stored as float NCHW when y is wanted as well.
        const float* v = ftile;
        if (residual != nullptr) {
          epilogue(t, np, pe.zc, pe.mul, pe.add, -kInf, kInf, ftile);
          add_residual_tile(ftile, np, nk, residual + at, OH * OW, lo, hi, rtile);
          v = rtile;
        } else {
          epilogue(t, np, pe.zc, pe.mul, pe.add, lo, hi, ftile);
        }
        quantize_row(v, np * kPanel, yinv, yz, qtile);
        const int64_t k0 = g * Kg + p * kPanel;
        const bool last = k0 + nk == s.K;  // the padding channels K..Ko-1 follow: the zero point
        uint8_t* dst = yq + ((n * OH + oy) * OW + ox0) * Ko + k0;
        // Bytes of each pixel this panel writes: its channels, and for the last panel the padding channels
        // K..Ko-1 (set to the zero point here), so m is 16 or, at the end, a multiple of 4 below 16.
        const int64_t m = last ? Ko - k0 : nk;
        if (last && m > nk)
          for (int j = 0; j < np; ++j)
            for (int64_t c = nk; c < m; ++c) qtile[j * kPanel + c] = static_cast<uint8_t>(yz);
        if (m == kPanel) {  // fixed-size copies (no library call a pixel)
          for (int j = 0; j < np; ++j) std::memcpy(dst + j * Ko, qtile + j * kPanel, kPanel);
        } else if (m >= 8) {  // two overlapping 8-byte copies
          for (int j = 0; j < np; ++j) {
            std::memcpy(dst + j * Ko, qtile + j * kPanel, 8);
            std::memcpy(dst + j * Ko + m - 8, qtile + j * kPanel + m - 8, 8);
          }
        } else if (m == 4) {
          for (int j = 0; j < np; ++j) std::memcpy(dst + j * Ko, qtile + j * kPanel, 4);
        } else {
          for (int j = 0; j < np; ++j) std::memcpy(dst + j * Ko, qtile + j * kPanel, static_cast<size_t>(m));
        }
        if (y != nullptr) store_channels(v, np, nk, y + at, OH * OW);
        return;
      }
      if (residual != nullptr) {  // the clamp after the residual Add
        epilogue(t, np, pe.zc, pe.mul, pe.add, -kInf, kInf, ftile);
        store_channels_residual(ftile, np, nk, residual + at, lo, hi, y + at, OH * OW);
      } else {
        epilogue(t, np, pe.zc, pe.mul, pe.add, lo, hi, ftile);
        store_channels(ftile, np, nk, y + at, OH * OW);
      }
    };
    for (int64_t p = pg * per_item; p < p_end;) {
      const bool pair = dot2 != nullptr && p + 1 < p_end;
      const int32_t* wsum = wg.wsum.data() + p * kPanel;
      const PanelEpilogue& e = epi[g * w0.panels + p];
      const PanelEpilogue& e2 = epi[g * w0.panels + (pair ? p + 1 : p)];
      for (int64_t ox0 = 0; ox0 < OW; ox0 += kMaxRun) {
        const int np = static_cast<int>(std::min<int64_t>(kMaxRun, OW - ox0));
        if (pair) {
          dot2(arow + ox0 * ps, ps, off.data(), wg.nblocks, wg.panel(p), wg.panel(p + 1), np, tile, tile2);
          store(tile, e, p, ox0, np);
          store(tile2, e2, p + 1, ox0, np);
        } else {
          dot(arow + ox0 * ps, ps, off.data(), wg.nblocks, wg.panel(p), wsum, np, tile);
          store(tile, e, p, ox0, np);
        }
      }
      p += pair ? 2 : 1;
    }
  };
  parallel_for(context, static_cast<size_t>(rows * pgroups), work);
}

void W2A8Conv::run_depthwise(OrtKernelContext* context, const float* x, int64_t N, int64_t H, int64_t W,
                             int64_t OH, int64_t OW, const ActQuant& q, const float* mul, const float* bias,
                             float lo, float hi, const float* residual, float* y) const {
  const W2A8ConvShape& s = s_;
  const int64_t C = s.group, Kg = s.K / s.group, taps = s.kH * s.kW;
  const int64_t Hp = H + s.pt + s.pb, Wp = W + s.pl + s.pr;
  const int64_t plane = Hp * Wp + 64;
  uint8_t* buf = byte_scratch(static_cast<size_t>(N * C * plane));
  const float inv = 1.0f / q.scale;
  const int32_t z = q.zero_point;
  const uint8_t zb = static_cast<uint8_t>(z);
  const QuantizeRowFn quantize_row = isa_->quantize_row;
  // The whole input quantized at once, then copied into the zero-point padded planes.
  const uint8_t* qx = quantize_all(context, quantize_row, x, N * C * H * W, inv, z, 0);
  auto fill = [&](size_t item) {
    uint8_t* dst = buf + int64_t(item) * plane;
    const uint8_t* src = qx + int64_t(item) * H * W;
    std::memset(dst, zb, static_cast<size_t>(plane));
    for (int64_t h = 0; h < H; ++h) std::memcpy(dst + (h + s.pt) * Wp + s.pl, src + h * W, static_cast<size_t>(W));
  };
  parallel_for(context, static_cast<size_t>(N * C), fill);
  const DepthwiseRowFn row_fn = isa_->depthwise_row;
  const ScaleRowFn scale_row = isa_->scale_row;
  if (s.sh == s.sw) {
    // The plane as one long row: virtual position v = oy * Wp + ox reads v * sw + tap offset (the same as
    // oy * sh * Wp + ox * sw since sh == sw), so one call sums several output rows (positions ox >= OW are
    // computed and dropped). Chunks of whole rows keep the sums in L1.
    const int64_t rows_per_chunk = std::max<int64_t>(1, 2048 / Wp);
    auto work = [&](size_t item) {
      const int64_t n = int64_t(item) / s.K, k = int64_t(item) % s.K, c = k / Kg;
      const uint8_t* src = buf + (n * C + c) * plane;
      const int8_t* wk = dw_weights_.data() + k * taps;
      const float m = mul[k], bi = bias ? bias[k] : 0.0f;
      const int32_t zc = z * dw_wsum_[k];
      thread_local std::vector<int32_t> acc;
      acc.resize(static_cast<size_t>(rows_per_chunk * Wp));
      float* out = y + (n * s.K + k) * OH * OW;
      for (int64_t r0 = 0; r0 < OH; r0 += rows_per_chunk) {
        const int64_t r1 = std::min(OH, r0 + rows_per_chunk);
        const int64_t cnt = (r1 - r0 - 1) * Wp + OW;
        row_fn(src + r0 * Wp * s.sw, Wp, wk, int(s.kH), int(s.kW), int(s.dh), int(s.dw), int(s.sw), cnt, acc.data());
        // Rows of OW sums packed together (in place: OW <= Wp), then one epilogue call for the chunk.
        int32_t* a = acc.data();
        if (OW != Wp)
          for (int64_t i = 1; i < r1 - r0; ++i) std::memmove(a + i * OW, a + i * Wp, sizeof(int32_t) * size_t(OW));
        if (residual != nullptr) {
          scale_row(a, (r1 - r0) * OW, zc, m, bi, -kInf, kInf, out + r0 * OW);
          add_residual(out + r0 * OW, residual + (n * s.K + k) * OH * OW + r0 * OW, (r1 - r0) * OW, lo, hi);
        } else {
          scale_row(a, (r1 - r0) * OW, zc, m, bi, lo, hi, out + r0 * OW);
        }
      }
    };
    parallel_for(context, static_cast<size_t>(N * s.K), work);
    return;
  }
  constexpr int64_t kChunkOut = 256;
  auto work = [&](size_t item) {
    const int64_t n = int64_t(item) / s.K, k = int64_t(item) % s.K, c = k / Kg;
    const uint8_t* src = buf + (n * C + c) * plane;
    const int8_t* wk = dw_weights_.data() + k * taps;
    const float m = mul[k], bi = bias ? bias[k] : 0.0f;
    const int32_t zc = z * dw_wsum_[k];
    int32_t acc[kChunkOut];
    for (int64_t oy = 0; oy < OH; ++oy) {
      float* dst = y + ((n * s.K + k) * OH + oy) * OW;
      for (int64_t ox0 = 0; ox0 < OW; ox0 += kChunkOut) {
        const int64_t cnt = std::min(kChunkOut, OW - ox0);
        row_fn(src + oy * s.sh * Wp + ox0 * s.sw, Wp, wk, int(s.kH), int(s.kW), int(s.dh), int(s.dw), int(s.sw), cnt,
               acc);
        if (residual != nullptr) {
          scale_row(acc, cnt, zc, m, bi, -kInf, kInf, dst + ox0);
          add_residual(dst + ox0, residual + ((n * s.K + k) * OH + oy) * OW + ox0, cnt, lo, hi);
        } else {
          scale_row(acc, cnt, zc, m, bi, lo, hi, dst + ox0);
        }
      }
    }
  };
  parallel_for(context, static_cast<size_t>(N * s.K), work);
}

// ------------------------------------------------------------------ gemm

W2A8Gemm::W2A8Gemm(int64_t N, int64_t Kin, const int8_t* dense) : N_(N), Kin_(Kin), isa_(&w2a8_isa()) {
  Kp_ = round4(Kin);
  w_ = pack_w2a8(N, Kp_ / 4, [&](int64_t n, int64_t q, int e) -> int {
    const int64_t i = 4 * q + e;
    return i < Kin ? dense[n * Kin + i] : 0;
  });
  offsets_.assign(static_cast<size_t>(w_.nblocks * 4), 0);
  for (int64_t q = 0; q < Kp_ / 4; ++q) offsets_[q] = static_cast<int32_t>(4 * q);
}

void W2A8Gemm::run(OrtKernelContext* context, const float* x, int64_t M, const ActQuant& q, const float* alpha,
                   const float* bias, float lo, float hi, float* y) const {
  const int64_t N = N_, Kin = Kin_, Kp = Kp_;
  uint8_t* buf = byte_scratch(static_cast<size_t>(M * Kp + 64));
  const float inv = 1.0f / q.scale;
  const int32_t z = q.zero_point;
  const QuantizeRowFn quantize_row = isa_->quantize_row;
  auto fill = [&](size_t item) {
    const int64_t m = int64_t(item);
    uint8_t* dst = buf + m * Kp;
    quantize_row(x + m * Kin, Kin, inv, z, dst);
    for (int64_t i = Kin; i < Kp; ++i) dst[i] = static_cast<uint8_t>(z);
  };
  parallel_for(context, static_cast<size_t>(M), fill);
  thread_local std::vector<float> mul_tls;  // the lambdas below see it through the local reference
  std::vector<float>& mul = mul_tls;
  mul.resize(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) mul[n] = alpha[n] * q.scale;
  const int64_t runs = (M + kMaxRun - 1) / kMaxRun;
  const int64_t pgroups = std::min(std::max<int64_t>(1, dot2_groups(isa_, w_.panels)),
                                   std::max<int64_t>(1, (kMinItems + runs - 1) / runs));
  const int64_t per_item = (w_.panels + pgroups - 1) / pgroups;
  const DotFn dot = isa_->dot;
  const Dot2Fn dot2 = isa_->dot2;
  const EpilogueFn epilogue = isa_->epilogue;
  auto work = [&](size_t item) {
    const int64_t pg = int64_t(item) % pgroups, r = int64_t(item) / pgroups;
    const int64_t m0 = r * kMaxRun;
    const int np = static_cast<int>(std::min<int64_t>(kMaxRun, M - m0));
    alignas(64) int32_t tile[kMaxRun * kPanel];
    alignas(64) float ftile[kMaxRun * kPanel];
    PanelEpilogue e;
    alignas(64) int32_t tile2[kMaxRun * kPanel];
    const int64_t p_end = std::min(w_.panels, (pg + 1) * per_item);
    auto store = [&](const int32_t* t, int64_t p) {
      const int32_t* wsum = w_.wsum.data() + p * kPanel;
      const int64_t nk = std::min<int64_t>(kPanel, N - p * kPanel);
      e.set(wsum, z, mul.data() + p * kPanel, bias ? bias + p * kPanel : nullptr, nk);
      epilogue(t, np, e.zc, e.mul, e.add, lo, hi, ftile);
      for (int j = 0; j < np; ++j)
        std::memcpy(y + (m0 + j) * N + p * kPanel, ftile + j * kPanel, sizeof(float) * static_cast<size_t>(nk));
    };
    for (int64_t p = pg * per_item; p < p_end;) {
      if (dot2 != nullptr && p + 1 < p_end) {
        dot2(buf + m0 * Kp, Kp, offsets_.data(), w_.nblocks, w_.panel(p), w_.panel(p + 1), np, tile, tile2);
        store(tile, p);
        store(tile2, p + 1);
        p += 2;
      } else {
        dot(buf + m0 * Kp, Kp, offsets_.data(), w_.nblocks, w_.panel(p), w_.wsum.data() + p * kPanel, np, tile);
        store(tile, p);
        p += 1;
      }
    }
  };
  parallel_for(context, static_cast<size_t>(runs * pgroups), work);
}

}  // namespace ocomp
