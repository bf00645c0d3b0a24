// Safetensors checkpoints, single file or sharded (model.safetensors.index.json).
// Invariant: a SafetensorsFile exists only after its whole header was validated against the file
// size (header length sane, JSON well formed, every tensor's byte range inside the data section,
// equal to dtype size x shape, no two ranges overlapping), so no later read can go out of bounds.
// Lying or truncated files are kDataLoss; missing files and shards are kNotFound.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/dtype.h"
#include "base/file.h"
#include "io/tensor_source.h"

namespace ferry::io {

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;
  // Reads the tensor's raw bytes into dst (dst_bytes must equal info.bytes).
  absl::Status Read(const TensorInfo& info, void* dst, size_t dst_bytes) const;
  absl::Status ReadRange(const TensorInfo& info, uint64_t begin, void* dst, size_t n) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  ScopedFd fd_;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards named by
// model.safetensors.index.json (every shard is opened and validated up front).
class Checkpoint final : public TensorSource {
 public:
  static absl::StatusOr<Checkpoint> Open(const std::string& dir);

  const TensorInfo* Find(const std::string& name) const override;
  absl::Status Read(const std::string& name, void* dst, size_t dst_bytes) const override;
  absl::Status ReadRange(const std::string& name, uint64_t begin, void* dst, size_t n) const override;
  std::vector<std::string> Names() const override;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // numel x dtype size bytes
};

// Writes a single-file safetensors checkpoint (written to PATH.tmp, then renamed).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

}  // namespace ferry::io
