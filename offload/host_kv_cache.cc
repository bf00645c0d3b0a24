#include "offload/host_kv_cache.h"

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::offload {

uint64_t HostKvCache::Bytes(int layers, int width, int rows, int max_len) {
  return 2ull * layers * static_cast<uint64_t>(rows) * max_len * width * sizeof(float);
}

absl::StatusOr<std::unique_ptr<HostKvCache>> HostKvCache::Create(kernels::Backend& device, int layers, int width, int rows,
                                                                  int max_len) {
  if (layers <= 0 || width <= 0 || rows <= 0 || max_len <= 0) return absl::InvalidArgumentError("host KV cache: bad dimensions");
  std::unique_ptr<HostKvCache> c(new HostKvCache());
  c->layers_ = layers, c->width_ = width, c->rows_ = rows, c->max_len_ = max_len;
  const size_t bytes = static_cast<size_t>(rows) * max_len * width * sizeof(float);
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
  const int64_t n = a.q.shape[0];
  const size_t count = static_cast<size_t>(n) * width_;
  q_.resize(count), kn_.resize(count), vn_.resize(count), out_.resize(count);
  FERRY_RETURN_IF_ERROR(b.CopyToHost(q_.data(), a.q.data, count * sizeof(float)));
  FERRY_RETURN_IF_ERROR(b.CopyToHost(kn_.data(), a.k.data, count * sizeof(float)));
  FERRY_RETURN_IF_ERROR(b.CopyToHost(vn_.data(), a.v.data, count * sizeof(float)));
  std::vector<int32_t> seq = *a.host_seq_ids, pos = *a.host_positions;
  auto host = [](void* p, std::initializer_list<int64_t> shape, DType t = DType::kF32) {
    return TensorView::Contiguous(p, t, shape);
  };
  const TensorView kc = host(k_[a.layer].data(), {rows_, max_len_, width_}), vc = host(v_[a.layer].data(), {rows_, max_len_, width_});
  const TensorView ids = host(seq.data(), {n}, DType::kI32), ps = host(pos.data(), {n}, DType::kI32);
  FERRY_RETURN_IF_ERROR(cpu_.KvWrite({host(kn_.data(), {n, width_}), host(vn_.data(), {n, width_}), kc, vc, ids, ps}));
  FERRY_RETURN_IF_ERROR(cpu_.Attention({host(q_.data(), {n, width_}), kc, vc, ids, ps, host(out_.data(), {n, width_}),
                                        a.num_heads, a.scale, TensorView{}}));
  return b.CopyToDevice(a.out.data, out_.data(), count * sizeof(float));
}

absl::StatusOr<std::unique_ptr<HostH2OCache>> HostH2OCache::Create(int layers, int heads, int head_dim, int rows,
                                                                    const H2OOptions& o) {
  std::unique_ptr<HostH2OCache> c(new HostH2OCache());
  c->width_ = heads * head_dim;
  FERRY_ASSIGN_OR_RETURN(c->inner_, H2OCache::Create(c->cpu_, layers, heads, head_dim, rows, o));
  return c;
}

uint64_t HostH2OCache::Bytes(int layers, int heads, int head_dim, int rows, const H2OOptions& o, int prefill_rows, int max_prompt) {
  return H2OCache::Bytes(layers, heads, head_dim, rows, o) + H2OCache::PrefillBytes(heads, head_dim, prefill_rows, max_prompt);
}

absl::Status HostH2OCache::Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const {
  return inner_->Check(seq_ids, positions);
}

absl::Status HostH2OCache::Attend(kernels::Backend& b, const AttendArgs& a) {
  const int64_t n = a.q.shape[0];
  const size_t count = static_cast<size_t>(n) * width_;
  q_.resize(count), kn_.resize(count), vn_.resize(count), out_.resize(count);
  FERRY_RETURN_IF_ERROR(b.CopyToHost(q_.data(), a.q.data, count * sizeof(float)));
  FERRY_RETURN_IF_ERROR(b.CopyToHost(kn_.data(), a.k.data, count * sizeof(float)));
  FERRY_RETURN_IF_ERROR(b.CopyToHost(vn_.data(), a.v.data, count * sizeof(float)));
  std::vector<int32_t> seq = *a.host_seq_ids, pos = *a.host_positions;
  auto host = [](void* p, std::initializer_list<int64_t> shape, DType t = DType::kF32) {
    return TensorView::Contiguous(p, t, shape);
  };
  AttendArgs h{a.layer,
               host(q_.data(), {n, width_}),
               host(kn_.data(), {n, width_}),
               host(vn_.data(), {n, width_}),
               host(seq.data(), {n}, DType::kI32),
               host(pos.data(), {n}, DType::kI32),
               &seq,
               &pos,
               host(out_.data(), {n, width_}),
               a.num_heads,
               a.scale};
  FERRY_RETURN_IF_ERROR(inner_->Attend(cpu_, h));
  return b.CopyToDevice(a.out.data, out_.data(), count * sizeof(float));
}

}  // namespace ferry::offload
