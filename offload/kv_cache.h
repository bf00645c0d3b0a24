// KV caches are created and sized here, in one place, from a KV shape: the dense cache in backend
// memory, H2O's evicting slot cache, and either of them in pinned host memory with the attention
// on the CPU. Memory plans call KvCacheBytes with the same spec that CreateKvCache allocates
// from, so a plan cannot drift from an allocation. Grouped-query attention is native: a cache
// holds kv_heads x head_dim per token, and each KV head serves its group of query heads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "offload/attention_cache.h"
#include "offload/h2o_cache.h"
#include "offload/weights.h"

namespace ferry::offload {

struct KvShape {
  int layers = 0, kv_heads = 0, head_dim = 0;
  KvType dtype = DType::kF32;  // keys and values: F32, F16, or q8/q4 groups along head_dim
  int width() const { return kv_heads * head_dim; }
};

struct KvCacheSpec {
  KvShape shape;
  int rows = 0;            // sequences
  int max_len = 0;         // positions per row (dense caches)
  bool on_host = false;    // pinned host memory, attention on the CPU
  std::optional<H2OOptions> h2o;  // evicting slots instead of the dense rows
  // H2O prefill's dense scratch: prompts per call and the longest prompt (0: rows and max_len).
  int prefill_rows = 0, max_prompt = 0;
  int query_heads = 0;     // the query heads that attend (a multiple of kv_heads; 0: as many)
};

struct KvBytes {
  uint64_t device = 0, host = 0;
};
// What CreateKvCache(spec) allocates (and, for H2O, the most a prefill call adds on top).
KvBytes KvCacheBytes(const KvCacheSpec& spec);
// `backend` holds a device cache, or allocates a host one's pinned memory.
absl::StatusOr<std::unique_ptr<AttentionCache>> CreateKvCache(kernels::Backend& backend, const KvCacheSpec& spec);

// The dense cache: per layer K and V of [rows, max_len, kv_heads * head_dim] in backend memory;
// token t of row r lives at position t.
class DenseKvCache final : public AttentionCache {
 public:
  static absl::StatusOr<std::unique_ptr<DenseKvCache>> Create(kernels::Backend& backend, const KvShape& shape, int rows, int max_len);
  int rows() const { return rows_; }
  int max_len() const { return max_len_; }
  const TensorView& k(int layer) const { return k_[layer].view; }
  const TensorView& v(int layer) const { return v_[layer].view; }

  absl::Status Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const override;
  absl::Status Attend(kernels::Backend& backend, const AttendArgs& args) override;

 private:
  DenseKvCache() = default;
  int rows_ = 0, max_len_ = 0;
  std::vector<Weight> k_, v_;
};

}  // namespace ferry::offload
