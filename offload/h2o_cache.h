// H2O KV eviction (Zhang et al. 2023), per sequence and per KV head, with slots overwritten in
// place. Each (layer, sequence, KV head) owns heavy + recent + 1 slots; with grouped-query
// attention a slot serves its group of query heads and its score is the sum of their
// probabilities. At every decode step the new token
// takes a free slot, attention runs over the occupied slots and returns each slot's probability in
// the same pass, every slot's fp32 score grows by its probability (the new token's too), and when
// more than heavy + recent slots are occupied the lowest-scoring slot that is neither among the
// `recent` newest positions nor among the first `protect` positions (attention sinks) is emptied
// (ties: the oldest). Scores are never summed over the batch. Positions stay absolute.
// Prefill (a row's whole prompt in one call, into an empty row) runs dense causal attention that
// also returns each prompt token's column sum of probabilities; the row keeps the `recent` newest
// tokens, the protected first ones, and the highest column sums up to `heavy`, each slot starting
// with its column sum as its score.
// Any other call (several tokens into a row that already holds some: a prompt in chunks, or
// prompts mixed with such rows) runs token by token in call order through the decode rule, as
// teacher forcing does.
// The bookkeeping (placement, scores, eviction, the prefill's selection) runs on the backend where
// the slots live, as the H2OPlace/H2OUpdate/H2OPrefill ops.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "offload/attention_cache.h"

namespace ferry::offload {

struct H2OOptions {
  int heavy = 0;    // heavy-hitter slots
  int recent = 0;   // recent-window slots
  int protect = 0;  // the first `protect` positions are never evicted (must be <= heavy)
};

// The same rule with no more slots than a sequence has positions (--h2o 100000000,... or --local
// 2000000000 mean "keep everything" for a context of max_len): heavy and recent cut to max_len,
// protect to heavy.
H2OOptions ClampToLength(const H2OOptions& o, int64_t max_len);

class H2OCache final : public AttentionCache {
 public:
  // Keys and values are kept as kv_dtype (F32, F16: half the bytes, or q8/q4 groups along
  // head_dim; a prefill's dense scratch is F16 then); scores stay fp32. `heads`
  // are the KV heads; query_heads (a multiple of them; 0: as many) attend to them.
  static absl::StatusOr<std::unique_ptr<H2OCache>> Create(kernels::Backend& backend, int layers, int heads, int head_dim,
                                                           int rows, const H2OOptions& options, KvType kv_dtype = DType::kF32,
                                                           int query_heads = 0);

  // A call gives each row one token (decode), or its whole prompt, positions 0..L-1, while the row
  // is still empty (prefill); otherwise each row's tokens must continue its positions in order and
  // the call runs token by token.
  absl::Status Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const override;
  absl::Status Attend(kernels::Backend& backend, const AttendArgs& args) override;

  int slots() const { return slots_; }
  // Device bytes this cache holds for `rows` rows, and the most a prefill call of `rows` prompts
  // (the longest `max_prompt` tokens) allocates on top, for memory plans.
  static uint64_t Bytes(int layers, int heads, int head_dim, int rows, const H2OOptions& o, KvType kv_dtype = DType::kF32,
                        int query_heads = 0);
  static uint64_t PrefillBytes(int heads, int head_dim, int rows, int max_prompt, KvType kv_dtype = DType::kF32,
                               int query_heads = 0);

  // Positions held by (layer, row, head), in slot order (-1: empty slot); read from the backend.
  std::vector<int> Held(int layer, int row, int head) const;
  // Scores of (layer, row, head)'s slots.
  std::vector<float> Scores(int layer, int row, int head) const;

 private:
  H2OCache() = default;
  absl::Status Prefill(kernels::Backend& backend, const AttendArgs& args);
  absl::Status Decode(kernels::Backend& backend, const AttendArgs& args);
  // Offset of (row, head)'s first slot in a layer's [rows, heads, slots] state.
  size_t Index(int row, int head) const { return (static_cast<size_t>(row) * heads_ + head) * slots_; }

  H2OOptions options_;
  KvType kv_dtype_ = DType::kF32;
  kernels::Backend* backend_ = nullptr;
  int layers_ = 0, heads_ = 0, head_dim_ = 0, rows_ = 0, slots_ = 0;
  int query_heads_ = 0;  // a multiple of heads_ (the KV heads)
  // Per layer, where the slots live: keys, values, and the bookkeeping ([rows, heads, slots]
  // positions (-1: empty), fp32 scores, occupancy), updated by the backend's H2O ops.
  std::vector<kernels::DeviceBuffer> k_, v_, pos_dev_, score_dev_, occupied_dev_;
  kernels::DeviceBuffer slot_ids_dev_, probs_dev_;
  std::vector<uint8_t> row_used_;  // rows that hold tokens (a prompt goes only into an empty row)
  mutable bool sequential_ = false;  // set by Check(): this call runs token by token
};

}  // namespace ferry::offload
