// Shared plumbing of the ocomp kernels: errors, attribute reading, constant
// inputs, decoded ternary weights, aligned buffers, ORT's intra-op pool.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace ocomp {

// A bad model or bad input; turned into an ORT error status at the C boundary.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline OrtStatus* to_status(const OrtApi& api, const char* what, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return api.CreateStatus(code, what);
}

// Runs `body` and converts any exception into an OrtStatus (never lets one
// cross into onnxruntime).
template <class F>
OrtStatus* guarded(const OrtApi& api, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const Error& e) {
    return to_status(api, e.what());
  } catch (const Ort::Exception& e) {
    return to_status(api, e.what(), e.GetOrtErrorCode());
  } catch (const std::bad_alloc&) {
    return to_status(api, "ocomp: out of memory", ORT_FAIL);
  } catch (const std::exception& e) {
    return to_status(api, e.what(), ORT_FAIL);
  } catch (...) {
    return to_status(api, "ocomp: unknown error", ORT_FAIL);
  }
}

// Reads an int64 array attribute; `present` tells whether the node has it.
inline std::vector<int64_t> attr_ints(const OrtApi& api, const OrtKernelInfo* info, const char* name, bool* present) {
  size_t size = 0;
  OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    *present = false;
    return {};
  }
  std::vector<int64_t> values(size);
  if (size > 0) {
    st = api.KernelInfoGetAttributeArray_int64(info, name, values.data(), &size);
    if (st != nullptr) {
      std::string msg = api.GetErrorMessage(st);
      api.ReleaseStatus(st);
      throw Error(std::string("attribute ") + name + ": " + msg);
    }
  }
  *present = true;
  return values;
}

inline bool attr_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* value) {
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, value);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return false;
  }
  return true;
}

// The constant initializer behind input `index`, or nullptr when the input is
// absent or computed at run time.
inline const OrtValue* constant_input(const OrtApi& api, const OrtKernelInfo* info, size_t index) {
  size_t count = 0;
  Ort::ThrowOnError(api.KernelInfo_GetInputCount(info, &count));
  if (index >= count) return nullptr;
  int is_constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return nullptr;
  }
  return is_constant ? value : nullptr;
}

// Element data of a tensor as a flat view; checks the element type.
template <class T>
struct TensorView {
  const T* data = nullptr;
  int64_t size = 0;
  std::vector<int64_t> shape;
};

template <class T>
TensorView<T> view_tensor(const OrtValue* value, ONNXTensorElementDataType expected, const char* what) {
  Ort::ConstValue v(value);
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != expected) throw Error(std::string(what) + " has the wrong element type");
  TensorView<T> out;
  out.shape = info.GetShape();
  out.size = static_cast<int64_t>(info.GetElementCount());
  out.data = out.size > 0 ? v.GetTensorData<T>() : nullptr;
  return out;
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// Ternary weights decoded once into per-output sparse lists: for output o,
// index[start[o] .. start[o] + nplus[o]) are the reduction rows with weight +1,
// then up to start[o + 1] the rows with weight -1 (both ascending).
struct SparseTernary {
  int64_t outputs = 0;
  int64_t rows = 0;
  std::vector<int32_t> index;
  std::vector<int64_t> start;
  std::vector<int32_t> nplus;
};

// `op` names the op in error messages. Validates the packed length and codes.
SparseTernary decode_sparse(const uint8_t* packed, int64_t packed_len, int64_t outputs, int64_t rows, const char* op);

// Per-output float vectors (alpha, bias) with their length checked.
std::vector<float> read_vector(const OrtValue* value, int64_t expected, const char* op, const char* name);

// 64-byte aligned float scratch, grown on demand and kept per thread (the
// thread calling Run), so repeated runs touch no fresh pages.
float* thread_scratch(size_t floats);

// Runs fn(i) for i in [0, total) on ORT's intra-op pool (intra_op_num_threads).
// fn must not throw.
template <class F>
void parallel_for(OrtKernelContext* context, size_t total, F& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(size_t{0});
    return;
  }
  auto trampoline = [](void* user, size_t i) { (*static_cast<F*>(user))(i); };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(context, trampoline, total, 0, &fn));
}

}  // namespace ocomp
