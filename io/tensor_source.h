// Where a model's tensors come from: a Hugging Face safetensors checkpoint or a ferry store.
// Both validate everything they can before the first read; reads never go out of bounds.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/dtype.h"
#include "base/quant.h"

namespace ferry::io {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute byte offset in its file
  uint64_t bytes = 0;
  // A group-wise quantized matrix (base/quant.h): dtype U8, shape the matrix's [rows, cols], bytes
  // its region's; nullopt for plain tensors.
  std::optional<QuantFormat> quant;
  int64_t numel() const;
};

class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual const TensorInfo* Find(const std::string& name) const = 0;
  // Reads the whole tensor; dst_bytes must equal its size.
  virtual absl::Status Read(const std::string& name, void* dst, size_t dst_bytes) const = 0;
  // Reads bytes [begin, begin + n) of the tensor.
  virtual absl::Status ReadRange(const std::string& name, uint64_t begin, void* dst, size_t n) const = 0;
  virtual std::vector<std::string> Names() const = 0;

  // What a tensor is stored as in its file ("F16", "Q4_1", ...), for reports.
  virtual std::string StorageType(const std::string& name) const;
  // Fills `out` (layout.bytes) with the float tensor `name` in format `f` without rounding when the
  // file's own blocks are that format (GGUF Q4_0/Q4_1/Q8_0 as q4g32/q8g32): true when it did,
  // false when the tensor must be quantized from its values instead.
  virtual absl::StatusOr<bool> ReadExactQuantized(const std::string& name, const QuantFormat& f, const QuantLayout& layout,
                                                  uint8_t* out) const;
};

// A ferry store when DIR/manifest.json exists, else a safetensors checkpoint.
absl::StatusOr<std::unique_ptr<TensorSource>> OpenTensorSource(const std::string& dir);

}  // namespace ferry::io
