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

namespace ferry::io {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute byte offset in the file
  uint64_t bytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;
  // Reads the tensor's raw bytes into dst (dst_bytes must equal info.bytes).
  absl::Status Read(const TensorInfo& info, void* dst, size_t dst_bytes) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  ScopedFd fd_;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards named by
// model.safetensors.index.json (every shard is opened and validated up front).
class Checkpoint {
 public:
  static absl::StatusOr<Checkpoint> Open(const std::string& dir);

  const TensorInfo* Find(const std::string& name) const;
  absl::Status Read(const std::string& name, void* dst, size_t dst_bytes) const;
  std::vector<std::string> Names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

}  // namespace ferry::io
