// Decoding of packed ternary weights and small shared helpers.
#include "common.h"

#include "packing.h"

namespace ocomp {

SparseTernary decode_sparse(const uint8_t* packed, int64_t packed_len, int64_t outputs, int64_t rows,
                            const char* op) {
  if (outputs <= 0 || rows <= 0) throw Error(std::string(op) + ": weight_shape must be positive");
  if (rows > INT32_MAX || outputs > INT32_MAX / 2 || outputs > INT64_MAX / rows)
    throw Error(std::string(op) + ": weight_shape too large");
  const int64_t count = outputs * rows;
  if (packed_len != packed_size(count))
    throw Error(std::string(op) + ": packed weights have " + std::to_string(packed_len) + " bytes, expected " +
                std::to_string(packed_size(count)) + " (ceil(" + std::to_string(count) +
                " weights / 4)) for the given weight_shape");
  if (packed == nullptr) throw Error(std::string(op) + ": packed weights are missing");
  SparseTernary w;
  w.outputs = outputs;
  w.rows = rows;
  w.start.resize(static_cast<size_t>(outputs) + 1);
  w.nplus.resize(static_cast<size_t>(outputs));
  std::vector<int32_t> minus;
  for (int64_t o = 0; o < outputs; ++o) {
    w.start[o] = static_cast<int64_t>(w.index.size());
    minus.clear();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = o * rows + r;
      const uint8_t code = code_at(packed, i);
      if (code == kCodePlus) {
        w.index.push_back(static_cast<int32_t>(r));
      } else if (code == kCodeMinus) {
        minus.push_back(static_cast<int32_t>(r));
      } else if (code == kCodeInvalid) {
        throw Error(std::string(op) + ": invalid 2-bit code 0b11 in packed weights at weight index " +
                    std::to_string(i) + " (byte " + std::to_string(i / 4) + ")");
      }
    }
    w.nplus[o] = static_cast<int32_t>(static_cast<int64_t>(w.index.size()) - w.start[o]);
    w.index.insert(w.index.end(), minus.begin(), minus.end());
  }
  w.start[outputs] = static_cast<int64_t>(w.index.size());
  if (w.index.size() > static_cast<size_t>(INT32_MAX)) throw Error(std::string(op) + ": too many weights");
  // The padding codes of the last byte must be valid too.
  for (int64_t i = count; i < packed_len * 4; ++i)
    if (code_at(packed, i) == kCodeInvalid)
      throw Error(std::string(op) + ": invalid 2-bit code 0b11 in the padding of the last packed byte");
  return w;
}

std::vector<float> read_vector(const OrtValue* value, int64_t expected, const char* op, const char* name) {
  TensorView<float> t = view_tensor<float>(value, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, name);
  if (t.shape.size() != 1 || t.size != expected)
    throw Error(std::string(op) + ": " + name + " must have shape [" + std::to_string(expected) + "], got " +
                shape_str(t.shape));
  return std::vector<float>(t.data, t.data + t.size);
}

namespace {
struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
}  // namespace

float* thread_scratch(size_t floats) {
  thread_local std::unique_ptr<float, AlignedFree> buffer;
  thread_local size_t capacity = 0;
  if (floats > capacity) {
    buffer.reset();
    capacity = 0;
    const size_t want = (floats + floats / 4 + 15) / 16 * 16;  // some headroom, whole cache lines
    void* p = std::aligned_alloc(64, want * sizeof(float));
    if (p == nullptr) throw std::bad_alloc();
    buffer.reset(static_cast<float*>(p));
    capacity = want;
  }
  return buffer.get();
}

}  // namespace ocomp
