#include "offload/model_weights.h"

#include "base/status.h"

namespace ferry::offload {

void ModelWeights::SetStreamed(std::unique_ptr<LayerStreamer> streamer, std::vector<std::vector<StreamedTensor>> streamed) {
  streamer_ = std::move(streamer);
  streamed_ = std::move(streamed);
}

absl::StatusOr<LayerWeights> ModelWeights::Acquire(int layer, kernels::Backend& backend) {
  LayerWeights w;
  for (int r = 0; r < kRoleCount; ++r) w.by_role[r] = layers_[layer][r].view;
  if (streamer_ == nullptr || streamed_[layer].empty()) return w;
  FERRY_ASSIGN_OR_RETURN(const char* base, streamer_->Acquire(layer));
  for (const StreamedTensor& t : streamed_[layer]) {
    w[t.role] = MakeView(const_cast<char*>(base) + t.offset, t.dtype, t.shape, backend.device());
    w[t.role].quant = t.quant;
  }
  return w;
}

absl::Status ModelWeights::Release(int layer, kernels::Backend& backend) {
  if (streamer_ == nullptr || streamed_[layer].empty()) return absl::OkStatus();
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Fence> fence, backend.RecordFence());
  return streamer_->Release(layer, std::move(fence));
}

uint64_t ModelWeights::resident_bytes() const {
  uint64_t total = 0;
  for (const Weight& w : globals_) total += w.buffer.bytes();
  for (const auto& layer : layers_) {
    for (const Weight& w : layer) total += w.buffer.bytes();
  }
  return total;
}

}  // namespace ferry::offload
