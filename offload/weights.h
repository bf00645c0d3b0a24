// A model's weights by role. A tensor role (what a tensor is in the layer program: the token
// embedding, a layer's Q projection, its FFN norm, ...) names a weight independently of the
// checkpoint's names, which each model family maps to roles. Weight owns a backend tensor;
// LayerWeights is the view of one decoder layer's tensors that the layer program reads while the
// layer is acquired (resident tensors, or the streamed block's matrices at their offsets).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "absl/status/statusor.h"
#include "base/tensor.h"
#include "kernels/backend.h"

namespace ferry::offload {

enum class Role : uint8_t {
  // Model-wide.
  kTokEmbed, kPosEmbed, kProjectIn, kProjectOut, kFinalNorm, kFinalNormBias, kLmHead,
  // Per decoder layer.
  kAttnNorm, kAttnNormBias, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kOBias, kQNorm, kKNorm,
  kFfnNorm, kFfnNormBias, kGate, kGateBias, kUp, kUpBias, kDown, kDownBias,
  kCount
};
inline constexpr int kRoleCount = static_cast<int>(Role::kCount);
// "tok_embed", "attn_q", ...: stable names (the store's manifest records them).
const char* RoleName(Role role);
bool IsLayerRole(Role role);

// A backend tensor that owns its memory.
struct Weight {
  kernels::DeviceBuffer buffer;
  TensorView view;
};
// A contiguous tensor of `shape` in `backend` memory (uninitialized).
absl::StatusOr<Weight> AllocWeight(kernels::Backend& backend, DType dtype, std::initializer_list<int64_t> shape);
// A contiguous view of `shape` at data.
TensorView MakeView(void* data, DType dtype, const std::vector<int64_t>& shape, Device device);

// One layer's tensors by role (data == nullptr: the layer has no such tensor).
struct LayerWeights {
  std::array<TensorView, kRoleCount> by_role{};
  const TensorView& operator[](Role r) const { return by_role[static_cast<int>(r)]; }
  TensorView& operator[](Role r) { return by_role[static_cast<int>(r)]; }
};

}  // namespace ferry::offload
