// Where a layer's keys and values go and how attention reads them back: the dense per-position
// cache (engine::KvCache) or H2O's evicting slot cache (offload::H2OCache). The model's layer
// program calls Attend once per layer; the cache decides what it stores.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "base/quant.h"
#include "base/tensor.h"
#include "kernels/backend.h"

namespace ferry::offload {

struct AttendArgs {
  int layer = 0;
  TensorView q, k, v;                 // [n, heads * head_dim] (k, v: kv_heads * head_dim) F32, device
  TensorView seq_ids, positions;      // [n] I32, device
  const std::vector<int32_t>* host_seq_ids = nullptr;    // the same, on the host
  const std::vector<int32_t>* host_positions = nullptr;
  TensorView out;                     // [n, heads * head_dim] F32, device
  int num_heads = 1;
  float scale = 1.0f;
  int num_kv_heads = 0;               // 0: num_heads
  int kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
};

class AttentionCache {
 public:
  virtual ~AttentionCache() = default;
  // Refuses a batch this cache cannot hold, before any work is queued.
  virtual absl::Status Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const = 0;
  // Stores the tokens' k and v for `layer` and computes out = attention(q) over the cache.
  virtual absl::Status Attend(kernels::Backend& backend, const AttendArgs& args) = 0;
};

// A contiguous view of a KV tensor of `type` (a quantized type: a U8 view of the region with its
// format and logical shape).
TensorView KvView(void* data, const KvType& type, std::initializer_list<int64_t> shape, Device device);

// The Check of a dense cache of rows x max_len positions: every token's row and position must fit.
absl::Status CheckDenseCacheBounds(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions, int rows,
                                   int max_len, const char* cache_name);

}  // namespace ferry::offload
