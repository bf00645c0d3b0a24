#include "offload/weights.h"

#include "base/status.h"

namespace ferry::offload {

const char* RoleName(Role role) {
  static constexpr const char* kNames[kRoleCount] = {
      "tok_embed", "pos_embed", "project_in", "project_out", "final_norm", "final_norm_bias", "lm_head",
      "attn_norm", "attn_norm_bias", "attn_q", "attn_q_bias", "attn_k", "attn_k_bias", "attn_v", "attn_v_bias",
      "attn_o", "attn_o_bias", "attn_q_norm", "attn_k_norm", "ffn_norm", "ffn_norm_bias", "ffn_gate", "ffn_gate_bias",
      "ffn_up", "ffn_up_bias", "ffn_down", "ffn_down_bias"};
  const int i = static_cast<int>(role);
  return i >= 0 && i < kRoleCount ? kNames[i] : "?";
}

bool IsLayerRole(Role role) { return role >= Role::kAttnNorm && role < Role::kCount; }

TensorView MakeView(void* data, DType dtype, const std::vector<int64_t>& shape, Device device) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int>(shape.size());
  FERRY_CHECK(v.ndim <= kMaxDims);
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    stride *= shape[d];
  }
  return v;
}

absl::StatusOr<Weight> AllocWeight(kernels::Backend& backend, DType dtype, std::initializer_list<int64_t> shape) {
  const std::vector<int64_t> dims(shape);
  size_t bytes = DTypeSize(dtype);
  for (int64_t d : dims) bytes *= static_cast<size_t>(d);
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend.Allocate(bytes));
  TensorView view = MakeView(buf.data(), dtype, dims, backend.device());
  return Weight{std::move(buf), view};
}

}  // namespace ferry::offload
