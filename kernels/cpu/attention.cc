// CPU causal attention over the KV cache, one (query, head) pair per work item: scores with the
// cache entries 0..pos, a max-subtracted softmax in fp32, then the probability-weighted sum of
// values. The [seq x seq] score matrix is never formed; each item holds one row of scores.
#include <algorithm>
#include <cmath>
#include <vector>

#include "base/quant.h"
#include "base/thread_pool.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::kernels {
namespace {

// q.k with 8 independent partial sums combined in a fixed order (vectorizes without
// reassociation, so the result is the same on every call).
inline float Dot(const float* q, const float* k, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t n8 = n / 8 * 8;
  for (int64_t d = 0; d < n8; d += 8) {
    for (int l = 0; l < 8; ++l) part[l] += q[d + l] * k[d + l];
  }
  float tail = 0.0f;
  for (int64_t d = n8; d < n; ++d) tail += q[d] * k[d];
  return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7])) + tail;
}

// Elements [offset, offset + n) of a KV cache (n within one row of its last dimension) as floats:
// the cache's own memory (F32), or `buf` converted from F16 or dequantized from q8/q4 (the span
// is whole groups), so every type runs the same fp32 arithmetic on its values.
class KvReader {
 public:
  explicit KvReader(const TensorView& t) : t_(t), cols_(t.shape[t.ndim - 1]) {
    if (t.quant) layout_ = KvQuantLayout(t);
  }
  const float* Row(int64_t offset, int64_t n, float* buf) const {
    if (t_.quant) {
      DequantizeSpan(*t_.quant, layout_, t_.as<const uint8_t>(), cols_, offset / cols_, offset % cols_, n, buf);
      return buf;
    }
    if (t_.dtype == DType::kF32) return t_.as<const float>() + offset;
    ConvertToF32(DType::kF16, t_.as<const uint16_t>() + offset, buf, static_cast<size_t>(n));
    return buf;
  }

 private:
  TensorView t_;
  int64_t cols_;
  QuantLayout layout_;
};

constexpr int64_t kMaxHeadDim = 1024;

}  // namespace

namespace {

// Attention of query i, head h over entries 0..pos[i] of its row (KV head h / group); returns the
// probabilities in `scores` (resized to the row's length).
void AttendOne(const AttentionArgs& a, const KvReader& kr, const KvReader& vr, int64_t i, int64_t h, std::vector<float>& scores) {
  const int64_t width = a.q.shape[1], head_dim = width / a.num_heads, max_len = a.k_cache.shape[1];
  const int64_t kv_width = a.k_cache.shape[2], group = a.num_heads / a.kv_heads();
  const int32_t seq = a.seq_ids.as<const int32_t>()[i];
  const int64_t len = static_cast<int64_t>(a.positions.as<const int32_t>()[i]) + 1;
  const float* q = a.q.as<const float>() + i * width + h * head_dim;
  const int64_t base = static_cast<int64_t>(seq) * max_len * kv_width + (h / group) * head_dim;
  float buf[kMaxHeadDim];
  scores.resize(static_cast<size_t>(len));
  float max_score = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = Dot(q, kr.Row(base + j * kv_width, head_dim, buf), head_dim) * a.scale;
    max_score = std::max(max_score, scores[j]);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    sum += scores[j];
  }
  const float inv = 1.0f / sum;
  float* out = a.out.as<float>() + i * width + h * head_dim;
  std::fill(out, out + head_dim, 0.0f);
  for (int64_t j = 0; j < len; ++j) {
    const float p = scores[j] * inv;
    scores[j] = p;
    const float* v = vr.Row(base + j * kv_width, head_dim, buf);
    for (int64_t d = 0; d < head_dim; ++d) out[d] += p * v[d];
  }
}

}  // namespace

void CpuAttention(ThreadPool& pool, const AttentionArgs& a) {
  const int64_t n = a.q.shape[0], heads = a.num_heads;
  const KvReader kr(a.k_cache), vr(a.v_cache);
  if (a.col_sums.data == nullptr) {
    pool.ParallelFor(n * heads, 4, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> scores;
      for (int64_t item = begin; item < end; ++item) AttendOne(a, kr, vr, item / heads, item % heads, scores);
    });
    return;
  }
  // With column sums: one task per (row, head) walks that row's queries in order, so the sums are
  // deterministic.
  const int64_t rows = a.k_cache.shape[0], max_len = a.k_cache.shape[1];
  const int32_t* seq = a.seq_ids.as<const int32_t>();
  pool.ParallelFor(rows * heads, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / heads, h = task % heads;
      float* col = a.col_sums.as<float>() + (row * heads + h) * max_len;
      for (int64_t i = 0; i < n; ++i) {
        if (seq[i] != row) continue;
        AttendOne(a, kr, vr, i, h, scores);
        for (size_t j = 0; j < scores.size(); ++j) col[j] += scores[j];
      }
    }
  });
}

void CpuSlotAttention(ThreadPool& pool, const SlotAttentionArgs& a) {
  const int64_t n = a.q.shape[0], width = a.q.shape[1];
  const int64_t kv_heads = a.k_slots.shape[1], slots = a.k_slots.shape[2], hd = a.k_slots.shape[3];
  const int64_t heads = width / hd, group = heads / kv_heads;
  const int32_t* seq = a.seq_ids.as<const int32_t>();
  const KvReader kr(a.k_slots), vr(a.v_slots);
  pool.ParallelFor(n * heads, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / heads, h = item % heads;
      const int64_t base = static_cast<int64_t>(seq[i]) * kv_heads + h / group;  // (seq, KV head)
      const uint8_t* occ = a.occupied.as<const uint8_t>() + base * slots;
      float buf[kMaxHeadDim];
      const float* q = a.q.as<const float>() + i * width + h * hd;
      float* p = a.probs.as<float>() + (i * heads + h) * slots;
      float max_score = -INFINITY;
      for (int64_t j = 0; j < slots; ++j) {
        p[j] = occ[j] ? Dot(q, kr.Row((base * slots + j) * hd, hd, buf), hd) * a.scale : -INFINITY;
        max_score = std::max(max_score, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < slots; ++j) {
        p[j] = occ[j] ? std::exp(p[j] - max_score) : 0.0f;
        sum += p[j];
      }
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      float* out = a.out.as<float>() + i * width + h * hd;
      std::fill(out, out + hd, 0.0f);
      for (int64_t j = 0; j < slots; ++j) {
        p[j] *= inv;
        if (p[j] == 0.0f) continue;
        const float* v = vr.Row((base * slots + j) * hd, hd, buf);
        for (int64_t d = 0; d < hd; ++d) out[d] += p[j] * v[d];
      }
    }
  });
}

}  // namespace ferry::kernels
