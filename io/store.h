// The ferry store: a converted model for the disk tier. One data file (weights.bin) in which
// every tensor starts at a 4 KiB boundary (O_DIRECT reads straight into pinned buffers) and each
// decoder layer's tensors lie contiguous in one 4 KiB-aligned region (one sequential read per
// layer), plus manifest.json (name, dtype, shape, offset, bytes, layout, layer, XXH3-64 checksum)
// and the model's config and tokenizer files, so a store is itself a model directory.
// Invariant: a Store exists only after its manifest was validated against the data file (aligned,
// in bounds, sizes equal to dtype x shape, no overlaps); a corrupt or truncated store is kDataLoss.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/file.h"
#include "io/tensor_source.h"

namespace ferry::io {

inline constexpr uint64_t kStoreAlignment = 4096;

struct StoreTensor {
  TensorInfo info;      // offset is within weights.bin
  uint64_t xxh3 = 0;    // XXH3-64 of the tensor's bytes
  int layer = -1;       // decoder layer, -1 for the others
  std::string layout = "row-major";
  std::string role;     // the tensor's role in its model family ("attn_q", ...), when recorded
};

struct StoreLayer {
  int index = 0;
  uint64_t offset = 0;  // the layer's region in weights.bin, 4 KiB-aligned
  uint64_t bytes = 0;   // a multiple of 4 KiB
};

class Store final : public TensorSource {
 public:
  static absl::StatusOr<Store> Open(const std::string& dir);

  const TensorInfo* Find(const std::string& name) const override;
  // Reads and checks the tensor's checksum (kDataLoss on mismatch).
  absl::Status Read(const std::string& name, void* dst, size_t dst_bytes) const override;
  absl::Status ReadRange(const std::string& name, uint64_t begin, void* dst, size_t n) const override;
  std::vector<std::string> Names() const override;

  // Recomputes every checksum; the first bad tensor is kDataLoss.
  absl::Status Verify(const std::function<void(uint64_t done, uint64_t total)>& progress = nullptr) const;

  const std::string& dir() const { return dir_; }
  const std::string& data_path() const { return data_path_; }
  uint64_t data_bytes() const { return data_bytes_; }
  const std::vector<StoreLayer>& layers() const { return layers_; }
  const StoreTensor* FindTensor(const std::string& name) const;
  std::vector<const StoreTensor*> LayerTensors(int layer) const;

 private:
  std::string dir_, data_path_;
  ScopedFd fd_;
  uint64_t data_bytes_ = 0;
  std::map<std::string, StoreTensor> tensors_;
  std::vector<StoreLayer> layers_;
};

struct PlannedTensor {
  std::string name;
  DType dtype = DType::kF16;
  std::vector<int64_t> shape;
  std::string role;  // recorded in the manifest when set
  std::optional<QuantFormat> quant;  // a quantized matrix: dtype U8, shape [rows, cols]
};

// Where a store puts each tensor (what StoreWriter writes): non-layer tensors first, then each
// layer's in order, every tensor 4 KiB-aligned, and each layer's region. The planner sizes stores
// that do not exist yet (a dummy, a float store quantized) with the same code.
struct StoreLayout {
  std::vector<PlannedTensor> order;
  std::vector<uint64_t> offsets, bytes;  // per tensor in order
  std::vector<StoreLayer> layers;        // in index order
  uint64_t total_bytes = 0;              // tensor bytes (no padding)
  uint64_t data_bytes = 0;               // weights.bin's size
};
absl::StatusOr<StoreLayout> LayoutStore(std::vector<PlannedTensor> tensors);

// Writes a store: the layout (non-layer tensors first, then each layer's, 4 KiB-aligned) is fixed
// at Create; tensors are then written in order(), each in one or more chunks, and Finish writes
// the side files and, last, the manifest.
class StoreWriter {
 public:
  static absl::StatusOr<StoreWriter> Create(const std::string& out_dir, std::vector<PlannedTensor> tensors);
  StoreWriter(StoreWriter&&) noexcept;
  StoreWriter& operator=(StoreWriter&&) noexcept;
  ~StoreWriter();

  const std::vector<PlannedTensor>& order() const { return order_; }
  uint64_t total_bytes() const { return total_; }
  // Appends the next `n` bytes of tensor `order()[index]`.
  absl::Status Write(size_t index, const void* data, size_t n);
  // side_files: file name -> contents (config.json, tokenizer files, ...).
  absl::Status Finish(const std::map<std::string, std::string>& side_files);

 private:
  StoreWriter();
  struct State;
  std::string out_dir_;
  std::vector<PlannedTensor> order_;
  std::vector<uint64_t> offsets_, bytes_, written_;
  std::vector<StoreLayer> layers_;
  uint64_t total_ = 0, data_bytes_ = 0;
  std::unique_ptr<State> state_;
};

struct ConvertOptions {
  std::function<void(uint64_t done, uint64_t total)> progress;  // bytes written so far
  size_t chunk_bytes = 64 << 20;  // tensors stream through a buffer of this size
  // The role of a checkpoint tensor in its model family ("" when none), recorded in the manifest.
  std::function<std::string(const std::string& name)> role_of;
  // Quantize the tensors quantize_tensor(name) selects (2-D float matrices) to this format: from the
  // file's own blocks when they are that format (TensorSource::ReadExactQuantized), else from
  // their values. Each matrix is quantized whole in memory (fp32).
  std::optional<QuantFormat> quantize;
  std::function<bool(const std::string& name)> quantize_tensor;
  // Filled when quantizing: per source storage type ("Q4_1", "F16"), how many matrices were
  // mapped without rounding and how many were quantized from their values.
  std::map<std::string, int>* mapped = nullptr;
  std::map<std::string, int>* requantized = nullptr;
};

// The tensors ConvertToStore writes for `source` with `options` (quantized where asked), in the
// source's order: the store's layout before it is written (LayoutStore).
absl::StatusOr<std::vector<PlannedTensor>> PlanConversion(const TensorSource& source, const ConvertOptions& options = {});

// Converts the model in `model_dir` (safetensors + config + tokenizer) into a store at `out_dir`.
// Streams tensor by tensor in chunks, so models larger than RAM convert; the manifest is written
// last (a crash leaves no valid store).
absl::Status ConvertToStore(const std::string& model_dir, const std::string& out_dir, const ConvertOptions& options = {});
// The same from any tensor source, with the side files (config.json, tokenizer.json, ...) given.
absl::Status ConvertToStore(const TensorSource& source, const std::map<std::string, std::string>& side_files,
                            const std::string& out_dir, const ConvertOptions& options = {});

// XXH3-64 of n bytes: the store's checksum.
uint64_t StoreHash(const void* data, size_t n);

// The decoder layer a tensor belongs to ("...layers.<i>...."), or -1.
int LayerOfTensor(const std::string& name);

}  // namespace ferry::io
