// Where a model's weights are, held by the model and reached by role: model-wide tensors and each
// layer's vectors are resident in backend memory; a layer's matrices are resident too, or streamed
// (the LayerStreamer brings the layer's block into a device slot and they are views into it at
// their offsets). Acquire(l) gives layer l's tensors by role; Release(l) hands a streamed block
// back once the compute that reads it has been queued. Acquire and Release move the stream: they
// are not const.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "offload/layer_streamer.h"
#include "offload/weights.h"

namespace ferry::offload {

// A layer matrix that arrives with the stream: at `offset` within the layer's placed range.
struct StreamedTensor {
  Role role;
  uint64_t offset = 0;
  DType dtype = DType::kF16;
  std::vector<int64_t> shape;
  std::optional<QuantFormat> quant;  // a quantized matrix's region (dtype U8)
};

class ModelWeights {
 public:
  explicit ModelWeights(int layers = 0) : layers_(static_cast<size_t>(layers)) {}

  void SetGlobal(Role role, Weight w) { globals_[static_cast<int>(role)] = std::move(w); }
  const TensorView& Global(Role role) const { return globals_[static_cast<int>(role)].view; }
  void SetLayer(int layer, Role role, Weight w) { layers_[layer][static_cast<int>(role)] = std::move(w); }
  // The layers' streamed matrices: streamed[l] lists layer l's.
  void SetStreamed(std::unique_ptr<LayerStreamer> streamer, std::vector<std::vector<StreamedTensor>> streamed);

  int num_layers() const { return static_cast<int>(layers_.size()); }
  absl::StatusOr<LayerWeights> Acquire(int layer, kernels::Backend& backend);
  absl::Status Release(int layer, kernels::Backend& backend);

  const LayerStreamer* streamer() const { return streamer_.get(); }
  // Bytes held resident in backend memory.
  uint64_t resident_bytes() const;

 private:
  std::array<Weight, kRoleCount> globals_;
  std::vector<std::array<Weight, kRoleCount>> layers_;
  std::unique_ptr<LayerStreamer> streamer_;
  std::vector<std::vector<StreamedTensor>> streamed_;
};

}  // namespace ferry::offload
