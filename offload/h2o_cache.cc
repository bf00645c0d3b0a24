#include "offload/h2o_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::offload {

H2OOptions ClampToLength(const H2OOptions& o, int64_t max_len) {
  H2OOptions c = o;
  const int cap = static_cast<int>(std::clamp<int64_t>(max_len, 1, 1 << 30));
  c.heavy = std::min(c.heavy, cap);
  c.recent = std::min(c.recent, cap);
  c.protect = std::min(c.protect, c.heavy);
  return c;
}

absl::StatusOr<std::unique_ptr<H2OCache>> H2OCache::Create(kernels::Backend& backend, int layers, int heads, int head_dim,
                                                            int rows, const H2OOptions& o, KvType kv_dtype, int query_heads) {
  if (query_heads == 0) query_heads = heads;
  if (!kv_dtype.quant && kv_dtype.dtype != DType::kF32 && kv_dtype.dtype != DType::kF16) {
    return absl::InvalidArgumentError("H2O cache: keys and values are F32, F16, q8 or q4");
  }
  if (kv_dtype.quant && head_dim % kv_dtype.quant->group != 0) return absl::InvalidArgumentError("H2O cache: the group must divide head_dim");
  if (o.heavy < 0 || o.recent < 0 || static_cast<int64_t>(o.heavy) + o.recent < 1 || static_cast<int64_t>(o.heavy) + o.recent > (1 << 24)) {
    return absl::InvalidArgumentError("H2O needs heavy >= 0, recent >= 0 and at least one slot");
  }
  if (o.protect < 0 || o.protect > o.heavy) {
    return absl::InvalidArgumentError(absl::StrCat("protected positions (", o.protect, ") must be between 0 and heavy (", o.heavy, ")"));
  }
  if (layers <= 0 || heads <= 0 || head_dim <= 0 || rows <= 0 || query_heads % heads != 0) {
    return absl::InvalidArgumentError("H2O cache: bad dimensions");
  }
  std::unique_ptr<H2OCache> c(new H2OCache());
  c->options_ = o;
  c->kv_dtype_ = kv_dtype;
  c->layers_ = layers, c->heads_ = heads, c->head_dim_ = head_dim, c->rows_ = rows;
  c->query_heads_ = query_heads;
  c->slots_ = o.heavy + o.recent + 1;  // the budget plus the incoming token
  c->backend_ = &backend;
  const size_t cells = static_cast<size_t>(rows) * heads * c->slots_;
  const std::vector<int32_t> empty_pos(cells, -1);
  const std::vector<float> zero_scores(cells, 0.0f);
  const std::vector<uint8_t> zero_occ(cells, 0);
  for (int l = 0; l < layers; ++l) {
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer k, backend.Allocate(kv_dtype.Bytes(static_cast<int64_t>(cells), head_dim)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer v, backend.Allocate(kv_dtype.Bytes(static_cast<int64_t>(cells), head_dim)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer pos, backend.Allocate(cells * sizeof(int32_t)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer score, backend.Allocate(cells * sizeof(float)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer occ, backend.Allocate(cells));
    FERRY_RETURN_IF_ERROR(backend.CopyToDevice(pos.data(), empty_pos.data(), cells * sizeof(int32_t)));
    FERRY_RETURN_IF_ERROR(backend.CopyToDevice(score.data(), zero_scores.data(), cells * sizeof(float)));
    FERRY_RETURN_IF_ERROR(backend.CopyToDevice(occ.data(), zero_occ.data(), cells));
    c->k_.push_back(std::move(k));
    c->v_.push_back(std::move(v));
    c->pos_dev_.push_back(std::move(pos));
    c->score_dev_.push_back(std::move(score));
    c->occupied_dev_.push_back(std::move(occ));
  }
  FERRY_ASSIGN_OR_RETURN(c->slot_ids_dev_, backend.Allocate(static_cast<size_t>(rows) * heads * sizeof(int32_t)));
  FERRY_ASSIGN_OR_RETURN(c->probs_dev_, backend.Allocate(cells / heads * query_heads * sizeof(float)));
  c->row_used_.assign(rows, 0);
  return c;
}

uint64_t H2OCache::Bytes(int layers, int heads, int head_dim, int rows, const H2OOptions& o, KvType kv_dtype, int query_heads) {
  if (query_heads == 0) query_heads = heads;
  const uint64_t cells = static_cast<uint64_t>(rows) * heads * (o.heavy + o.recent + 1);
  return static_cast<uint64_t>(layers) * (2 * kv_dtype.Bytes(static_cast<int64_t>(cells), head_dim) +
                                          cells * (sizeof(int32_t) + sizeof(float) + 1)) +
         cells / heads * query_heads * sizeof(float) +  // the probabilities, per query head
         static_cast<uint64_t>(rows) * heads * sizeof(int32_t);
}

uint64_t H2OCache::PrefillBytes(int heads, int head_dim, int rows, int max_prompt, KvType kv_type, int query_heads) {
  const DType kv_dtype = kv_type.dense_dtype();
  if (query_heads == 0) query_heads = heads;
  // A dense K and V for the prompts (kv_dtype), the column sums (per query head), and the ids of
  // the selection (a row and a slot per KV head for each prompt token), one layer at a time.
  return static_cast<uint64_t>(rows) * max_prompt *
             (2 * heads * head_dim * DTypeSize(kv_dtype) + (query_heads + heads + 2) * sizeof(float)) +
         static_cast<uint64_t>(rows) * 2 * sizeof(int32_t);
}

absl::Status H2OCache::Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const {
  std::vector<int> count(rows_, 0);
  std::vector<int> max_pos(rows_, -1);
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    if (seq_ids[i] < 0 || seq_ids[i] >= rows_) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", seq_ids[i], " is outside the H2O cache of ", rows_, " rows"));
    }
    ++count[seq_ids[i]];
    max_pos[seq_ids[i]] = std::max(max_pos[seq_ids[i]], positions[i]);
  }
  sequential_ = false;
  const bool prefill = std::any_of(count.begin(), count.end(), [](int c) { return c > 1; });
  if (!prefill) return absl::OkStatus();  // decode: one token per row
  bool all_prompts = true;  // every row with tokens gets positions 0..count-1 and is still empty
  for (int r = 0; r < rows_; ++r) {
    if (count[r] > 0 && (max_pos[r] != count[r] - 1 || row_used_[r])) all_prompts = false;
  }
  if (all_prompts) return absl::OkStatus();
  // Token by token: each row's tokens must continue its positions, in call order.
  std::vector<int> next(rows_, -1);
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    const int r = seq_ids[i];
    if (next[r] >= 0 && positions[i] != next[r]) {
      return absl::InvalidArgumentError(absl::StrCat("H2O: sequence ", r, " gets position ", positions[i], " after ", next[r] - 1,
                                                     "; a row's tokens in a call must be consecutive positions in order"));
    }
    next[r] = positions[i] + 1;
  }
  sequential_ = true;
  return absl::OkStatus();
}

absl::Status H2OCache::Prefill(kernels::Backend& b, const AttendArgs& a) {
  const std::vector<int32_t>& seq = *a.host_seq_ids;
  const std::vector<int32_t>& pos = *a.host_positions;
  const int l = a.layer, width = heads_ * head_dim_;
  int max_len = 0;
  for (int32_t p : pos) max_len = std::max(max_len, p + 1);
  const Device dev = b.device();
  // The dense scratch holds only this call's rows: map them to 0..used-1.
  std::vector<int> compact(rows_, -1), rows_used;
  std::vector<int32_t> local(seq.size());
  for (size_t i = 0; i < seq.size(); ++i) {
    if (compact[seq[i]] < 0) {
      compact[seq[i]] = static_cast<int>(rows_used.size());
      rows_used.push_back(seq[i]);
    }
    local[i] = compact[seq[i]];
  }
  const int used = static_cast<int>(rows_used.size());
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer local_dev, b.Allocate(local.size() * sizeof(int32_t)));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(local_dev.data(), local.data(), local.size() * sizeof(int32_t)));
  const TensorView local_ids =
      TensorView::Contiguous(local_dev.data(), DType::kI32, {static_cast<int64_t>(local.size())}, dev);
  const size_t dense_cells = static_cast<size_t>(used) * max_len * width;
  // The prompt's keys and values in the cache's type, so that prefill attends to what the dense
  // cache of that type would hold (budget >= length: the same logits as the full cache).
  // (A quantized cache's prompt scratch is F16: prefill attends to the prompt in f16, decode to
  // the quantized slots.)
  const DType dense = kv_dtype_.dense_dtype();
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer k_dense, b.Allocate(dense_cells * DTypeSize(dense)));
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer v_dense, b.Allocate(dense_cells * DTypeSize(dense)));
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer cols_dev,
                         b.Allocate(static_cast<size_t>(used) * query_heads_ * max_len * sizeof(float)));
  std::vector<float> cols(static_cast<size_t>(used) * query_heads_ * max_len, 0.0f);
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(cols_dev.data(), cols.data(), cols.size() * sizeof(float)));
  const TensorView kd = TensorView::Contiguous(k_dense.data(), dense, {used, max_len, width}, dev);
  const TensorView vd = TensorView::Contiguous(v_dense.data(), dense, {used, max_len, width}, dev);
  const TensorView cv = TensorView::Contiguous(cols_dev.data(), DType::kF32, {used, query_heads_, max_len}, dev);
  FERRY_RETURN_IF_ERROR(b.KvWrite({a.k, a.v, kd, vd, local_ids, a.positions}));
  kernels::AttentionArgs attn{a.q, kd, vd, local_ids, a.positions, a.out, query_heads_, a.scale, cv};
  attn.num_kv_heads = heads_;
  attn.host_seq_ids = local.data();
  attn.host_positions = pos.data();
  FERRY_RETURN_IF_ERROR(b.Attention(attn));
  // Choose the kept tokens where the scores are (H2OPrefill), then move their keys and values
  // from the dense scratch into the slots (SlotKvWrite): no round trip to the host.
  std::vector<int32_t> meta(2 * static_cast<size_t>(used), 0);  // lengths, then rows
  for (size_t i = 0; i < seq.size(); ++i) meta[local[i]] = std::max(meta[local[i]], pos[i] + 1);
  for (int u = 0; u < used; ++u) {
    meta[used + u] = rows_used[u];
    row_used_[rows_used[u]] = 1;
  }
  const int64_t tokens = static_cast<int64_t>(used) * max_len;
  std::vector<int32_t> token_row(tokens);
  for (int64_t t = 0; t < tokens; ++t) token_row[t] = rows_used[t / max_len];
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer ids_dev,
                         b.Allocate((meta.size() + token_row.size() + static_cast<size_t>(tokens) * heads_) * sizeof(int32_t)));
  int32_t* meta_dev = static_cast<int32_t*>(ids_dev.data());
  int32_t* row_dev = meta_dev + meta.size();
  int32_t* slot_dev = row_dev + token_row.size();
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(meta_dev, meta.data(), meta.size() * sizeof(int32_t)));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(row_dev, token_row.data(), token_row.size() * sizeof(int32_t)));
  const TensorView slot_pos = TensorView::Contiguous(pos_dev_[l].data(), DType::kI32, {rows_, heads_, slots_}, dev);
  const TensorView scores = TensorView::Contiguous(score_dev_[l].data(), DType::kF32, {rows_, heads_, slots_}, dev);
  const TensorView occ = TensorView::Contiguous(occupied_dev_[l].data(), DType::kU8, {rows_, heads_, slots_}, dev);
  const TensorView token_slot = TensorView::Contiguous(slot_dev, DType::kI32, {tokens, heads_}, dev);
  FERRY_RETURN_IF_ERROR(b.H2OPrefill({cv, TensorView::Contiguous(meta_dev, DType::kI32, {used}, dev),
                                      TensorView::Contiguous(meta_dev + used, DType::kI32, {used}, dev), slot_pos, scores, occ,
                                      token_slot, options_.heavy, options_.recent, options_.protect}));
  const TensorView k_slots = KvView(k_[l].data(), kv_dtype_, {rows_, heads_, slots_, head_dim_}, dev);
  const TensorView v_slots = KvView(v_[l].data(), kv_dtype_, {rows_, heads_, slots_, head_dim_}, dev);
  FERRY_RETURN_IF_ERROR(b.SlotKvWrite({TensorView::Contiguous(k_dense.data(), dense, {tokens, width}, dev),
                                       TensorView::Contiguous(v_dense.data(), dense, {tokens, width}, dev), k_slots,
                                       v_slots, TensorView::Contiguous(row_dev, DType::kI32, {tokens}, dev), token_slot}));
  // The scratch buffers are freed in stream order on the GPU; the CPU ran synchronously.
  return absl::OkStatus();
}

absl::Status H2OCache::Attend(kernels::Backend& b, const AttendArgs& a) {
  const std::vector<int32_t>& seq = *a.host_seq_ids;
  const int n = static_cast<int>(seq.size());
  if (a.num_heads != query_heads_ || a.kv_heads() != heads_) {
    return absl::InvalidArgumentError("H2O cache: head counts differ from the model's");
  }
  if (sequential_) {
    // One token at a time, in call order: each sees the slots as the tokens before it left them.
    for (int i = 0; i < n; ++i) {
      const std::vector<int32_t> one_seq = {seq[i]}, one_pos = {(*a.host_positions)[i]};
      AttendArgs t{a.layer, a.q.Rows(i, i + 1), a.k.Rows(i, i + 1), a.v.Rows(i, i + 1), a.seq_ids.Rows(i, i + 1),
                   a.positions.Rows(i, i + 1), &one_seq, &one_pos, a.out.Rows(i, i + 1), a.num_heads, a.scale,
                   a.num_kv_heads};
      FERRY_RETURN_IF_ERROR(Decode(b, t));
    }
    return absl::OkStatus();
  }
  std::vector<bool> seen(rows_, false);
  for (int32_t s : seq) {
    if (seen[s]) return Prefill(b, a);
    seen[s] = true;
  }
  return Decode(b, a);
}

absl::Status H2OCache::Decode(kernels::Backend& b, const AttendArgs& a) {
  const std::vector<int32_t>& seq = *a.host_seq_ids;
  const int n = static_cast<int>(seq.size());
  const int l = a.layer;
  const Device dev = b.device();
  for (int32_t r : seq) row_used_[r] = 1;
  const TensorView k_slots = KvView(k_[l].data(), kv_dtype_, {rows_, heads_, slots_, head_dim_}, dev);
  const TensorView v_slots = KvView(v_[l].data(), kv_dtype_, {rows_, heads_, slots_, head_dim_}, dev);
  const TensorView slot_pos = TensorView::Contiguous(pos_dev_[l].data(), DType::kI32, {rows_, heads_, slots_}, dev);
  const TensorView scores = TensorView::Contiguous(score_dev_[l].data(), DType::kF32, {rows_, heads_, slots_}, dev);
  const TensorView occ = TensorView::Contiguous(occupied_dev_[l].data(), DType::kU8, {rows_, heads_, slots_}, dev);
  const TensorView slot_view = TensorView::Contiguous(slot_ids_dev_.data(), DType::kI32, {n, heads_}, dev);
  const TensorView probs = TensorView::Contiguous(probs_dev_.data(), DType::kF32, {n, query_heads_, slots_}, dev);
  // Everything stays where the slots are: place the new token, store its k and v, attend (which
  // returns each slot's probability), then accumulate and evict. No host round trip.
  FERRY_RETURN_IF_ERROR(b.H2OPlace({a.seq_ids, a.positions, slot_pos, scores, occ, slot_view}));
  FERRY_RETURN_IF_ERROR(b.SlotKvWrite({a.k, a.v, k_slots, v_slots, a.seq_ids, slot_view}));
  FERRY_RETURN_IF_ERROR(b.SlotAttention({a.q, k_slots, v_slots, occ, a.seq_ids, a.out, probs, a.scale}));
  return b.H2OUpdate({a.seq_ids, a.positions, probs, slot_pos, scores, occ, options_.heavy + options_.recent, options_.recent,
                      options_.protect});
}

std::vector<int> H2OCache::Held(int layer, int row, int head) const {
  std::vector<int> out(slots_, -1);
  const absl::Status st = backend_->CopyToHost(out.data(), static_cast<const int32_t*>(pos_dev_[layer].data()) + Index(row, head),
                                               slots_ * sizeof(int32_t));
  FERRY_CHECK(st.ok());
  return out;
}

std::vector<float> H2OCache::Scores(int layer, int row, int head) const {
  std::vector<float> out(slots_, 0.0f);
  const absl::Status st = backend_->CopyToHost(out.data(), static_cast<const float*>(score_dev_[layer].data()) + Index(row, head),
                                               slots_ * sizeof(float));
  FERRY_CHECK(st.ok());
  return out;
}

}  // namespace ferry::offload
