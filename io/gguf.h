// GGUF files (llama.cpp's model format, versions 2 and 3): a header of typed key/value metadata,
// tensor infos, then the aligned tensor data.
// Invariant: a GgufFile exists only after the whole header was validated against the file size
// (every string and array length inside the file, counts bounded by the bytes left, keys and tensor
// names unique, 1-4 nonzero dimensions without overflow, a known tensor type whose block divides the
// row, every tensor's byte range aligned, inside the data section and disjoint from the others), so
// no later read can go out of bounds. A lying or truncated file is kDataLoss; a well-formed file
// using something ferry does not implement (a tensor type, nested arrays) is kInvalidArgument.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/file.h"

namespace ferry::io {

enum class GgufValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9,
  kU64 = 10, kI64 = 11, kF64 = 12,
};

// One metadata value. Scalars: integers in `i` (signed types) or `u` (unsigned), floats in `f`.
// Arrays: `array_type` and the items in `strings`, `ints` (every integer type and bool) or `floats`.
struct GgufValue {
  GgufValueType type = GgufValueType::kU8;
  GgufValueType array_type = GgufValueType::kU8;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  bool b = false;
  std::string s;
  std::vector<std::string> strings;
  std::vector<int64_t> ints;
  std::vector<double> floats;
};

// ggml tensor types ferry reads (others are refused by number and name).
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14,
  kBF16 = 30,
};
const char* GgmlTypeName(uint32_t type);
// Elements per block and bytes per block of a supported type; false for others.
bool GgmlBlock(uint32_t type, int64_t* elements, int64_t* bytes);

struct GgufTensor {
  std::string name;
  uint32_t type = 0;
  std::vector<uint64_t> ne;  // ggml order: ne[0] is the contiguous (row) dimension
  uint64_t offset = 0;       // absolute byte offset in the file
  uint64_t bytes = 0;
  int64_t row_elements() const { return static_cast<int64_t>(ne[0]); }
  int64_t rows() const;      // product of ne[1..]
  int64_t row_bytes() const;
  // The shape in row-major (PyTorch / safetensors) order: ne reversed.
  std::vector<int64_t> shape() const;
};

// Dequantizes `n` elements (a multiple of the type's block) of `type` from `src` into f32, with
// the arithmetic of ggml's reference dequantizers (and the gguf package's numpy ones): the same
// bits on every input.
void DequantizeGgml(uint32_t type, const void* src, float* dst, int64_t n);

class GgufFile {
 public:
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const GgufValue* Find(const std::string& key) const;
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* FindTensor(const std::string& name) const;

  // Typed metadata readers: kNotFound when absent, kInvalidArgument naming the key when its type
  // does not fit (any integer type for Uint/Int, an integer or float for Float).
  absl::StatusOr<std::string> String(const std::string& key) const;
  absl::StatusOr<uint64_t> Uint(const std::string& key) const;
  absl::StatusOr<double> Float(const std::string& key) const;
  absl::StatusOr<bool> Bool(const std::string& key) const;
  absl::StatusOr<const std::vector<std::string>*> Strings(const std::string& key) const;
  absl::StatusOr<const std::vector<int64_t>*> Ints(const std::string& key) const;
  absl::StatusOr<const std::vector<double>*> Floats(const std::string& key) const;

  // Raw bytes [begin, begin + n) of a tensor.
  absl::Status ReadRaw(const GgufTensor& t, uint64_t begin, void* dst, size_t n) const;
  // Rows [row0, row0 + rows) of a tensor dequantized to f32 (rows x row_elements floats).
  absl::Status ReadRowsF32(const GgufTensor& t, int64_t row0, int64_t rows, float* dst) const;

 private:
  GgufFile() = default;
  std::string path_;
  ScopedFd fd_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> by_name_;
};

}  // namespace ferry::io
