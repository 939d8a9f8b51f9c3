// TernaryGemm / TernaryMatMul.
//
// Many rows (M >= kMinTiledRows): X is transposed into Xt[Kin][Mp] (Mp = M
// rounded up to whole tiles) so that input i of 64 consecutive rows is 64
// consecutive floats; then the conv accumulation kernel applies unchanged with
// offset(i) = i * Mp. Few rows (e.g. a classifier head at batch 1): per output,
// lookup tables: for every group of 4 inputs a 256-entry table holds all the
// signed sums +-x0 +-x1 +-x2 +-x3 indexed by the 2-bit code byte, so each
// output adds one table entry per 4 weights (adds only; tables are built with
// adds too). Very long rows fall back to scalar sums over the index lists.
#include "ternary_gemm.h"

#include <algorithm>

#include "packing.h"

namespace ocomp {

namespace {
constexpr int64_t kMinTiledRows = 8;
constexpr int64_t kRowsPerBlock = 64;  // reduction rows x 64 floats = 16 KB in L1
constexpr int64_t kScalarChunk = 64;   // outputs per work item on the scalar path
constexpr int64_t kMaxTableFloats = int64_t{4} << 20;  // lookup tables up to 16 MB

// Row-aligned code bytes: row n's weights start at a byte boundary.
std::vector<uint8_t> row_codes(const uint8_t* packed, int64_t rows, int64_t cols) {
  const int64_t bytes = (cols + 3) / 4;
  std::vector<uint8_t> out(static_cast<size_t>(rows * bytes), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * bytes + c / 4] |= static_cast<uint8_t>(code_at(packed, r * cols + c) << (2 * (c % 4)));
  return out;
}

// table[b] = sum over the 4 slots of (+x, -x or 0 by code), for every byte b.
inline void build_table(const float* x4, float* table) {
  float lo[16], hi[16];
  const float v0[4] = {0.0f, x4[0], -x4[0], 0.0f}, v1[4] = {0.0f, x4[1], -x4[1], 0.0f};
  const float v2[4] = {0.0f, x4[2], -x4[2], 0.0f}, v3[4] = {0.0f, x4[3], -x4[3], 0.0f};
  for (int b = 0; b < 16; ++b) {
    lo[b] = v0[b & 3] + v1[b >> 2];
    hi[b] = v2[b & 3] + v3[b >> 2];
  }
  for (int h = 0; h < 16; ++h)
    for (int l = 0; l < 16; ++l) table[h * 16 + l] = lo[l] + hi[h];
}
}  // namespace

struct GemmPlan {
  int64_t Mp = 0, nblocks = 0;
  std::vector<int32_t> offsets;
  std::vector<ListRef> refs;  // refs[b * N + n]
};

TernaryGemmKernel::TernaryGemmKernel(const OrtApi& api, const OrtKernelInfo* info, bool matmul) : matmul_(matmul) {
  bool present = false;
  std::vector<int64_t> ws = attr_ints(api, info, "weight_shape", &present);
  if (!present) throw Error(std::string(name()) + ": attribute weight_shape (N, Kin) is required");
  if (ws.size() != 2 || ws[0] <= 0 || ws[1] <= 0 || ws[0] > (int64_t{1} << 24) || ws[1] > (int64_t{1} << 24))
    throw Error(std::string(name()) + ": weight_shape must be 2 values (N, Kin) in [1, 2^24], got " +
                shape_str(ws));
  N_ = ws[0];
  Kin_ = ws[1];
  act_ = read_act_attrs(api, info, name());
  if (const OrtValue* packed = constant_input(api, info, 1)) {
    TensorView<uint8_t> t = view_tensor<uint8_t>(packed, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "packed weights");
    weights_ = decode_sparse(t.data, t.size, N_, Kin_, name());
    const_weights_ = true;
    if (act_.mode != ActAttrs::kFloat) {
      w2a8_ = std::make_unique<const W2A8Gemm>(N_, Kin_, dense_weights(weights_).data());
      weights_ = SparseTernary{};  // the W2A8 panels are all that is kept
    } else {
      row_codes_ = row_codes(t.data, N_, Kin_);
    }
  } else if (act_.mode != ActAttrs::kFloat) {
    w2a8_isa();  // an OCOMP_ISA the CPU cannot run fails at session creation
  }
  if (const OrtValue* alpha = constant_input(api, info, 2)) {
    alpha_ = read_vector(alpha, N_, name(), "alpha");
    const_alpha_ = true;
  }
  if (const OrtValue* bias = constant_input(api, info, 3)) {
    bias_ = read_vector(bias, N_, name(), "bias");
    const_bias_ = true;
  }
}

std::shared_ptr<const GemmPlan> TernaryGemmKernel::plan_for(int64_t Mp, const SparseTernary& w, bool cache) {
  if (cache) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (plan_ && plan_->Mp == Mp) return plan_;
  }
  auto plan = std::make_shared<GemmPlan>();
  GemmPlan& p = *plan;
  p.Mp = Mp;
  p.nblocks = (Kin_ + kRowsPerBlock - 1) / kRowsPerBlock;
  p.refs.resize(static_cast<size_t>(p.nblocks * N_));
  p.offsets.reserve(w.index.size());
  for (int64_t n = 0; n < N_; ++n) {
    const int32_t* plus = w.index.data() + w.start[n];
    const int32_t* plus_end = plus + w.nplus[n];
    const int32_t* minus = plus_end;
    const int32_t* minus_end = w.index.data() + w.start[n + 1];
    for (int64_t b = 0; b < p.nblocks; ++b) {
      const int64_t row_end = (b + 1) * kRowsPerBlock;
      ListRef& ref = p.refs[b * N_ + n];
      ref.begin = static_cast<int32_t>(p.offsets.size());
      int32_t c = 0;
      for (; plus < plus_end && *plus < row_end; ++plus, ++c) p.offsets.push_back(static_cast<int32_t>(*plus * Mp));
      ref.nplus = c;
      c = 0;
      for (; minus < minus_end && *minus < row_end; ++minus, ++c)
        p.offsets.push_back(static_cast<int32_t>(*minus * Mp));
      ref.nminus = c;
    }
  }
  if (cache) {
    std::lock_guard<std::mutex> lock(mutex_);
    plan_ = plan;
  }
  return plan;
}

void TernaryGemmKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const char* op = name();
  TensorView<float> x = view_tensor<float>(ctx.GetInput(0), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "X");
  if (matmul_) {
    if (x.shape.empty()) throw Error(std::string(op) + ": X must have rank >= 1, got a scalar");
  } else if (x.shape.size() != 2) {
    throw Error(std::string(op) + ": X must be 2-D [M, Kin], got shape " + shape_str(x.shape));
  }
  if (x.shape.back() != Kin_)
    throw Error(std::string(op) + ": X has " + std::to_string(x.shape.back()) +
                " input features (last dim), but weight_shape[1] = " + std::to_string(Kin_));
  const int64_t M = Kin_ > 0 ? x.size / Kin_ : 0;

  SparseTernary runtime_weights;
  const SparseTernary* w = &weights_;
  std::vector<uint8_t> codes_buffer;
  const std::vector<uint8_t>* codes = &row_codes_;
  if (!const_weights_) {
    TensorView<uint8_t> t = view_tensor<uint8_t>(ctx.GetInput(1), ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "packed");
    runtime_weights = decode_sparse(t.data, t.size, N_, Kin_, op);
    w = &runtime_weights;
    if (act_.mode == ActAttrs::kFloat) {
      codes_buffer = row_codes(t.data, N_, Kin_);
      codes = &codes_buffer;
    }
  }
  std::vector<float> runtime_alpha, runtime_bias;
  const std::vector<float>* alpha = &alpha_;
  if (!const_alpha_) {
    runtime_alpha = read_vector(ctx.GetInput(2), N_, op, "alpha");
    alpha = &runtime_alpha;
  }
  const std::vector<float>* bias = &bias_;
  if (!const_bias_) {
    bias = nullptr;
    if (ctx.GetInputCount() > 3) {
      Ort::ConstValue b = ctx.GetInput(3);
      if (b) {
        runtime_bias = read_vector(b, N_, op, "bias");
        bias = &runtime_bias;
      }
    }
  }

  std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
  out_shape.push_back(N_);
  Ort::UnownedValue y_value = ctx.GetOutput(0, out_shape);
  float* y = y_value.GetTensorMutableData<float>();
  if (M == 0) return;
  const float* xd = x.data;
  const float* alpha_d = alpha->data();
  const float* bias_d = bias ? bias->data() : nullptr;
  const int64_t N = N_, Kin = Kin_;
  if (act_.mode != ActAttrs::kFloat) {
    std::unique_ptr<const W2A8Gemm> runtime_w2a8;
    const W2A8Gemm* w2a8 = w2a8_.get();
    if (w2a8 == nullptr) {
      runtime_w2a8 = std::make_unique<const W2A8Gemm>(N, Kin, dense_weights(*w).data());
      w2a8 = runtime_w2a8.get();
    }
    w2a8->run(context, xd, M, run_quant(act_, context, xd, x.size), alpha_d, bias_d, act_.lo, act_.hi, y);
    return;
  }
  const float lo = act_.lo, hi = act_.hi;

  const int64_t groups = (Kin + 3) / 4;
  if (M < kMinTiledRows && M * groups * 256 <= kMaxTableFloats) {
    float* tables = thread_scratch(static_cast<size_t>(M * groups * 256));
    auto build = [&](size_t item) {
      const int64_t m = int64_t(item) / groups, g = int64_t(item) % groups;
      float x4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t j = 0; j < 4 && 4 * g + j < Kin; ++j) x4[j] = xd[m * Kin + 4 * g + j];
      build_table(x4, tables + (m * groups + g) * 256);
    };
    parallel_for(context, static_cast<size_t>(M * groups), build);
    const uint8_t* code_d = codes->data();
    const int64_t chunks = (N + kScalarChunk - 1) / kScalarChunk;
    auto work = [&](size_t item) {
      const int64_t n0 = int64_t(item) * kScalarChunk, n1 = std::min(N, n0 + kScalarChunk);
      // Blocks of 16 groups: their tables (16 KB) stay in L1 while every
      // output of the chunk adds its 16 entries.
      float acc[kScalarChunk];
      for (int64_t m = 0; m < M; ++m) {
        const float* tm = tables + m * groups * 256;
        std::fill(acc, acc + (n1 - n0), 0.0f);
        for (int64_t g0 = 0; g0 < groups; g0 += 16) {
          const int64_t g1 = std::min(groups, g0 + 16);
          for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* row = code_d + n * groups;
            float s0 = 0, s1 = 0;
            int64_t g = g0;
            for (; g + 2 <= g1; g += 2) {
              s0 += tm[g * 256 + row[g]];
              s1 += tm[(g + 1) * 256 + row[g + 1]];
            }
            if (g < g1) s0 += tm[g * 256 + row[g]];
            acc[n - n0] += s0 + s1;
          }
        }
        for (int64_t n = n0; n < n1; ++n)
          y[m * N + n] = clamp_out(acc[n - n0] * alpha_d[n] + (bias_d ? bias_d[n] : 0.0f), lo, hi);
      }
    };
    parallel_for(context, static_cast<size_t>(chunks), work);
    return;
  }

  if (M < kMinTiledRows) {
    const int64_t chunks = (N + kScalarChunk - 1) / kScalarChunk;
    auto work = [&](size_t item) {
      const int64_t n0 = int64_t(item) * kScalarChunk, n1 = std::min(N, n0 + kScalarChunk);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xd + m * Kin;
        for (int64_t n = n0; n < n1; ++n) {
          const int32_t* idx = w->index.data() + w->start[n];
          const int32_t np = w->nplus[n];
          const int32_t nt = static_cast<int32_t>(w->start[n + 1] - w->start[n]);
          float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
          int32_t i = 0;
          for (; i + 4 <= np; i += 4) {
            s0 += xr[idx[i]];
            s1 += xr[idx[i + 1]];
            s2 += xr[idx[i + 2]];
            s3 += xr[idx[i + 3]];
          }
          for (; i < np; ++i) s0 += xr[idx[i]];
          for (; i + 4 <= nt; i += 4) {
            s0 -= xr[idx[i]];
            s1 -= xr[idx[i + 1]];
            s2 -= xr[idx[i + 2]];
            s3 -= xr[idx[i + 3]];
          }
          for (; i < nt; ++i) s0 -= xr[idx[i]];
          y[m * N + n] = clamp_out(((s0 + s1) + (s2 + s3)) * alpha_d[n] + (bias_d ? bias_d[n] : 0.0f), lo, hi);
        }
      }
    };
    parallel_for(context, static_cast<size_t>(chunks), work);
    return;
  }

  const int64_t tiles = (M + kTile - 1) / kTile;
  const int64_t Mp = tiles * kTile;
  if (double(Mp) * double(Kin) > double(INT32_MAX) - 64)
    throw Error(std::string(op) + ": X too large (" + std::to_string(M) + " x " + std::to_string(Kin) + ")");
  std::shared_ptr<const GemmPlan> plan_ptr = plan_for(Mp, *w, const_weights_);
  const GemmPlan& p = *plan_ptr;
  float* xt = thread_scratch(static_cast<size_t>(Mp * Kin));

  // Transpose X into Xt[i][m], zero rows m >= M; blocks of 64 rows x 64 inputs.
  const int64_t ib = (Kin + 63) / 64;
  auto transpose = [&](size_t item) {
    const int64_t tile = int64_t(item) / ib, i0 = (int64_t(item) % ib) * 64;
    const int64_t i1 = std::min(Kin, i0 + 64), m0 = tile * kTile, m1 = std::min(M, m0 + kTile);
    for (int64_t i = i0; i < i1; ++i) {
      float* dst = xt + i * Mp;
      for (int64_t m = m0; m < m1; ++m) dst[m] = xd[m * Kin + i];
      for (int64_t m = m1; m < m0 + kTile; ++m) dst[m] = 0.0f;
    }
  };
  parallel_for(context, static_cast<size_t>(tiles * ib), transpose);

  const AccumulateFn accumulate = accumulate_kernel();
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  auto work = [&](size_t item) {
    const int64_t tile = int64_t(item) / nchunks, nc = int64_t(item) % nchunks;
    const int64_t n0 = nc * kChunk;
    const int nk = static_cast<int>(std::min<int64_t>(kChunk, N - n0));
    const int64_t m0 = tile * kTile, m1 = std::min(M, m0 + kTile);
    alignas(64) float partial[kChunk * kTile];
    const int npix = static_cast<int>((m1 - m0 + 7) / 8 * 8);
    for (int64_t b = 0; b < p.nblocks; ++b)
      accumulate(xt + m0, p.offsets.data(), &p.refs[b * N + n0], nk, partial, b == 0, npix);
    for (int kk = 0; kk < nk; ++kk) {
      const int64_t n = n0 + kk;
      const float al = alpha_d[n], bi = bias_d ? bias_d[n] : 0.0f;
      for (int64_t m = m0; m < m1; ++m) y[m * N + n] = clamp_out(partial[kk * kTile + (m - m0)] * al + bi, lo, hi);
    }
  };
  parallel_for(context, static_cast<size_t>(tiles * nchunks), work);
}

}  // namespace ocomp
