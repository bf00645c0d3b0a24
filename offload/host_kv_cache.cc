#include "offload/host_kv_cache.h"

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::offload {

namespace {

TensorView host(void* p, std::initializer_list<int64_t> shape, DType t = DType::kF32) { return TensorView::Contiguous(p, t, shape); }

}  // namespace

absl::Status HostTokens::Download(kernels::Backend& b, const AttendArgs& a, int width, int kv_width) {
  const size_t count = static_cast<size_t>(a.q.shape[0]) * width, kv_count = static_cast<size_t>(a.q.shape[0]) * kv_width;
  q.resize(count), k.resize(kv_count), v.resize(kv_count), out.resize(count);
  FERRY_RETURN_IF_ERROR(b.CopyToHost(q.data(), a.q.data, count * sizeof(float)));
  FERRY_RETURN_IF_ERROR(b.CopyToHost(k.data(), a.k.data, kv_count * sizeof(float)));
  return b.CopyToHost(v.data(), a.v.data, kv_count * sizeof(float));
}

absl::Status HostTokens::Upload(kernels::Backend& b, const AttendArgs& a) const {
  return b.CopyToDevice(a.out.data, out.data(), out.size() * sizeof(float));
}

uint64_t HostKvCache::Bytes(int layers, int width, int rows, int max_len, KvType kv_dtype) {
  return 2ull * layers * kv_dtype.Bytes(static_cast<int64_t>(rows) * max_len, width);
}

absl::StatusOr<std::unique_ptr<HostKvCache>> HostKvCache::Create(kernels::Backend& device, int layers, int width, int rows,
                                                                  int max_len, KvType kv_dtype) {
  if (layers <= 0 || width <= 0 || rows <= 0 || max_len <= 0) return absl::InvalidArgumentError("host KV cache: bad dimensions");
  if (!kv_dtype.quant && kv_dtype.dtype != DType::kF32 && kv_dtype.dtype != DType::kF16) {
    return absl::InvalidArgumentError("host KV cache: F32, F16, q8 or q4");
  }
  std::unique_ptr<HostKvCache> c(new HostKvCache());
  c->layers_ = layers, c->width_ = width, c->rows_ = rows, c->max_len_ = max_len;
  c->kv_dtype_ = kv_dtype;
  const size_t bytes = kv_dtype.Bytes(static_cast<int64_t>(rows) * max_len, width);
  for (int l = 0; l < layers; ++l) {
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer k, device.AllocateHost(bytes));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer v, device.AllocateHost(bytes));
    c->k_.push_back(std::move(k));
    c->v_.push_back(std::move(v));
  }
  return c;
}

absl::Status HostKvCache::Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const {
  return CheckDenseCacheBounds(seq_ids, positions, rows_, max_len_, "host KV cache");
}

absl::Status HostKvCache::Attend(kernels::Backend& b, const AttendArgs& a) {
  const int64_t n = a.q.shape[0], q_width = a.q.shape[1];
  FERRY_RETURN_IF_ERROR(tokens_.Download(b, a, static_cast<int>(q_width), width_));
  std::vector<int32_t> seq = *a.host_seq_ids, pos = *a.host_positions;
  const TensorView kc = KvView(k_[a.layer].data(), kv_dtype_, {rows_, max_len_, width_}, Device::kCpu),
                   vc = KvView(v_[a.layer].data(), kv_dtype_, {rows_, max_len_, width_}, Device::kCpu);
  const TensorView ids = host(seq.data(), {n}, DType::kI32), ps = host(pos.data(), {n}, DType::kI32);
  FERRY_RETURN_IF_ERROR(cpu_.KvWrite({host(tokens_.k.data(), {n, width_}), host(tokens_.v.data(), {n, width_}), kc, vc, ids, ps}));
  kernels::AttentionArgs attn{host(tokens_.q.data(), {n, q_width}), kc, vc, ids, ps, host(tokens_.out.data(), {n, q_width}),
                              a.num_heads, a.scale, TensorView{}};
  attn.num_kv_heads = a.num_kv_heads;
  FERRY_RETURN_IF_ERROR(cpu_.Attention(attn));
  return tokens_.Upload(b, a);
}

absl::StatusOr<std::unique_ptr<HostH2OCache>> HostH2OCache::Create(int layers, int heads, int head_dim, int rows,
                                                                    const H2OOptions& o, KvType kv_dtype, int query_heads) {
  std::unique_ptr<HostH2OCache> c(new HostH2OCache());
  if (query_heads == 0) query_heads = heads;
  c->width_ = query_heads * head_dim;
  c->kv_width_ = heads * head_dim;
  FERRY_ASSIGN_OR_RETURN(c->inner_, H2OCache::Create(c->cpu_, layers, heads, head_dim, rows, o, kv_dtype, query_heads));
  return c;
}

uint64_t HostH2OCache::Bytes(int layers, int heads, int head_dim, int rows, const H2OOptions& o, int prefill_rows, int max_prompt,
                             KvType kv_dtype, int query_heads) {
  return H2OCache::Bytes(layers, heads, head_dim, rows, o, kv_dtype, query_heads) +
         H2OCache::PrefillBytes(heads, head_dim, prefill_rows, max_prompt, kv_dtype, query_heads);
}

absl::Status HostH2OCache::Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const {
  return inner_->Check(seq_ids, positions);
}

absl::Status HostH2OCache::Attend(kernels::Backend& b, const AttendArgs& a) {
  const int64_t n = a.q.shape[0];
  FERRY_RETURN_IF_ERROR(tokens_.Download(b, a, width_, kv_width_));
  std::vector<int32_t> seq = *a.host_seq_ids, pos = *a.host_positions;
  AttendArgs h{a.layer,
               host(tokens_.q.data(), {n, width_}),
               host(tokens_.k.data(), {n, kv_width_}),
               host(tokens_.v.data(), {n, kv_width_}),
               host(seq.data(), {n}, DType::kI32),
               host(pos.data(), {n}, DType::kI32),
               &seq,
               &pos,
               host(tokens_.out.data(), {n, width_}),
               a.num_heads,
               a.scale,
               a.num_kv_heads};
  FERRY_RETURN_IF_ERROR(inner_->Attend(cpu_, h));
  return tokens_.Upload(b, a);
}

}  // namespace ferry::offload
