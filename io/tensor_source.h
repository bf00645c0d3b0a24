// Where a model's tensors come from: a Hugging Face safetensors checkpoint or a ferry store.
// Both validate everything they can before the first read; reads never go out of bounds.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/dtype.h"

namespace ferry::io {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute byte offset in its file
  uint64_t bytes = 0;
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
};

// A ferry store when DIR/manifest.json exists, else a safetensors checkpoint.
absl::StatusOr<std::unique_ptr<TensorSource>> OpenTensorSource(const std::string& dir);

}  // namespace ferry::io
