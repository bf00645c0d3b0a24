// The KV cache in pinned host memory, with attention computed on the CPU next to it (FlexGen's
// CPU attention): per layer only q, k, v of the new tokens go down (device -> host) and the
// attention output comes back up, instead of the whole cache crossing the link. Counted against
// the host budget, not the device's.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/cpu_backend.h"
#include "offload/attention_cache.h"
#include "offload/h2o_cache.h"

namespace ferry::offload {

// A call's q, k, v brought down to the host, and its attention output sent back.
struct HostTokens {
  std::vector<float> q, k, v, out;
  // q and out are [n, width], k and v [n, kv_width].
  absl::Status Download(kernels::Backend& backend, const AttendArgs& args, int width, int kv_width);
  absl::Status Upload(kernels::Backend& backend, const AttendArgs& args) const;
};

class HostKvCache final : public AttentionCache {
 public:
  // `device` allocates the pinned memory (and does the copies); rows x max_len tokens per layer.
  static absl::StatusOr<std::unique_ptr<HostKvCache>> Create(kernels::Backend& device, int layers, int width, int rows,
                                                              int max_len, KvType kv_dtype = DType::kF32);
  static uint64_t Bytes(int layers, int width, int rows, int max_len, KvType kv_dtype = DType::kF32);

  absl::Status Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const override;
  absl::Status Attend(kernels::Backend& backend, const AttendArgs& args) override;

 private:
  HostKvCache() = default;
  int layers_ = 0, width_ = 0, rows_ = 0, max_len_ = 0;
  KvType kv_dtype_ = DType::kF32;
  std::vector<kernels::DeviceBuffer> k_, v_;  // pinned host, per layer [rows, max_len, width]
  kernels::CpuBackend cpu_;                   // runs the attention on the host memory
  HostTokens tokens_;
};

// H2O's evicting cache kept in host memory the same way (`ferry bench --kv cpu --h2o H,R`): the
// slots, their bookkeeping and the attention live on the CPU; per layer only the new tokens' q, k,
// v go down and the attention output comes back.
class HostH2OCache final : public AttentionCache {
 public:
  static absl::StatusOr<std::unique_ptr<HostH2OCache>> Create(int layers, int heads, int head_dim, int rows, const H2OOptions& o,
                                                               KvType kv_dtype = DType::kF32, int query_heads = 0);
  // Host bytes: the slots and bookkeeping, plus the prefill's dense scratch for `prefill_rows`
  // prompts of up to `max_prompt` tokens.
  static uint64_t Bytes(int layers, int heads, int head_dim, int rows, const H2OOptions& o, int prefill_rows, int max_prompt,
                        KvType kv_dtype = DType::kF32, int query_heads = 0);

  absl::Status Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const override;
  absl::Status Attend(kernels::Backend& backend, const AttendArgs& args) override;
  const H2OCache& slots() const { return *inner_; }

 private:
  HostH2OCache() = default;
  int width_ = 0, kv_width_ = 0;
  kernels::CpuBackend cpu_;
  std::unique_ptr<H2OCache> inner_;  // on cpu_
  HostTokens tokens_;
};

}  // namespace ferry::offload
