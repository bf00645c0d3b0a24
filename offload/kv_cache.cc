#include "offload/kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/status.h"
#include "offload/host_kv_cache.h"

namespace ferry::offload {
namespace {

absl::Status CheckSpec(const KvCacheSpec& s) {
  const KvShape& k = s.shape;
  if (k.layers <= 0 || k.kv_heads <= 0 || k.head_dim <= 0 || s.rows <= 0 || (!s.h2o && s.max_len <= 0)) {
    return absl::InvalidArgumentError("KV cache needs at least one layer, KV head, row and position");
  }
  if (!k.dtype.quant && k.dtype.dtype != DType::kF32 && k.dtype.dtype != DType::kF16) {
    return absl::InvalidArgumentError("KV cache: keys and values are F32, F16, q8 or q4");
  }
  if (k.dtype.quant && k.head_dim % k.dtype.quant->group != 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache: head_dim ", k.head_dim, " is not a multiple of the group ", k.dtype.quant->group));
  }
  return absl::OkStatus();
}

uint64_t DenseBytes(const KvShape& k, int rows, int max_len) {
  return 2ull * k.layers * k.dtype.Bytes(static_cast<int64_t>(rows) * max_len, k.width());
}

}  // namespace

KvBytes KvCacheBytes(const KvCacheSpec& s) {
  const KvShape& k = s.shape;
  KvBytes b;
  uint64_t bytes = 0;
  if (s.h2o) {
    const int prefill_rows = s.prefill_rows > 0 ? s.prefill_rows : s.rows;
    const int max_prompt = s.max_prompt > 0 ? s.max_prompt : s.max_len;
    bytes = H2OCache::Bytes(k.layers, k.kv_heads, k.head_dim, s.rows, *s.h2o, k.dtype, s.query_heads) +
            H2OCache::PrefillBytes(k.kv_heads, k.head_dim, prefill_rows, max_prompt, k.dtype, s.query_heads);
  } else {
    bytes = DenseBytes(k, s.rows, s.max_len);
  }
  (s.on_host ? b.host : b.device) = bytes;
  return b;
}

absl::StatusOr<std::unique_ptr<AttentionCache>> CreateKvCache(kernels::Backend& backend, const KvCacheSpec& s) {
  FERRY_RETURN_IF_ERROR(CheckSpec(s));
  const KvShape& k = s.shape;
  if (s.h2o && s.on_host) return HostH2OCache::Create(k.layers, k.kv_heads, k.head_dim, s.rows, *s.h2o, k.dtype, s.query_heads);
  if (s.h2o) return H2OCache::Create(backend, k.layers, k.kv_heads, k.head_dim, s.rows, *s.h2o, k.dtype, s.query_heads);
  if (s.on_host) return HostKvCache::Create(backend, k.layers, k.width(), s.rows, s.max_len, k.dtype);
  return DenseKvCache::Create(backend, k, s.rows, s.max_len);
}

absl::StatusOr<std::unique_ptr<DenseKvCache>> DenseKvCache::Create(kernels::Backend& backend, const KvShape& k, int rows,
                                                                   int max_len) {
  KvCacheSpec spec;
  spec.shape = k, spec.rows = rows, spec.max_len = max_len;
  FERRY_RETURN_IF_ERROR(CheckSpec(spec));
  std::unique_ptr<DenseKvCache> cache(new DenseKvCache());
  cache->rows_ = rows;
  cache->max_len_ = max_len;
  for (int l = 0; l < k.layers; ++l) {
    for (auto* list : {&cache->k_, &cache->v_}) {
      Weight w;
      FERRY_ASSIGN_OR_RETURN(w.buffer, backend.Allocate(k.dtype.Bytes(static_cast<int64_t>(rows) * max_len, k.width())));
      w.view = KvView(w.buffer.data(), k.dtype, {rows, max_len, k.width()}, backend.device());
      list->push_back(std::move(w));
    }
  }
  return cache;
}

absl::Status DenseKvCache::Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const {
  return CheckDenseCacheBounds(seq_ids, positions, rows_, max_len_, "KV cache");
}

absl::Status DenseKvCache::Attend(kernels::Backend& b, const AttendArgs& a) {
  FERRY_RETURN_IF_ERROR(b.KvWrite({a.k, a.v, k(a.layer), v(a.layer), a.seq_ids, a.positions}));
  kernels::AttentionArgs args{a.q, k(a.layer), v(a.layer), a.seq_ids, a.positions, a.out, a.num_heads, a.scale, TensorView{}};
  args.num_kv_heads = a.num_kv_heads;
  if (a.host_seq_ids != nullptr && a.host_positions != nullptr) {
    args.host_seq_ids = a.host_seq_ids->data();
    args.host_positions = a.host_positions->data();
  }
  return b.Attention(args);
}

}  // namespace ferry::offload
