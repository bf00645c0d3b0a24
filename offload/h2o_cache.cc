#include "offload/h2o_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::offload {

absl::StatusOr<std::unique_ptr<H2OCache>> H2OCache::Create(kernels::Backend& backend, int layers, int heads, int head_dim,
                                                            int rows, const H2OOptions& o) {
  if (o.heavy < 0 || o.recent < 0 || o.heavy + o.recent < 1) {
    return absl::InvalidArgumentError("H2O needs heavy >= 0, recent >= 0 and at least one slot");
  }
  if (o.protect < 0 || o.protect > o.heavy) {
    return absl::InvalidArgumentError(absl::StrCat("protected positions (", o.protect, ") must be between 0 and heavy (", o.heavy, ")"));
  }
  if (layers <= 0 || heads <= 0 || head_dim <= 0 || rows <= 0) return absl::InvalidArgumentError("H2O cache: bad dimensions");
  std::unique_ptr<H2OCache> c(new H2OCache());
  c->options_ = o;
  c->layers_ = layers, c->heads_ = heads, c->head_dim_ = head_dim, c->rows_ = rows;
  c->slots_ = o.heavy + o.recent + 1;  // the budget plus the incoming token
  const size_t cells = static_cast<size_t>(rows) * heads * c->slots_;
  for (int l = 0; l < layers; ++l) {
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer k, backend.Allocate(cells * head_dim * sizeof(float)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer v, backend.Allocate(cells * head_dim * sizeof(float)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer occ, backend.Allocate(cells));
    c->k_.push_back(std::move(k));
    c->v_.push_back(std::move(v));
    c->occupied_dev_.push_back(std::move(occ));
  }
  FERRY_ASSIGN_OR_RETURN(c->slot_ids_dev_, backend.Allocate(static_cast<size_t>(rows) * heads * sizeof(int32_t)));
  FERRY_ASSIGN_OR_RETURN(c->probs_dev_, backend.Allocate(cells * sizeof(float)));
  c->position_.assign(cells * layers, -1);
  c->score_.assign(cells * layers, 0.0f);
  c->occupied_.assign(cells * layers, 0);
  return c;
}

absl::Status H2OCache::Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const {
  std::vector<bool> seen(rows_, false);
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    if (seq_ids[i] < 0 || seq_ids[i] >= rows_) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", seq_ids[i], " is outside the H2O cache of ", rows_, " rows"));
    }
    if (seen[seq_ids[i]]) {
      return absl::UnimplementedError("the H2O cache takes one token per sequence per call (prefill with H2O is not implemented yet)");
    }
    seen[seq_ids[i]] = true;
  }
  return absl::OkStatus();
}

absl::Status H2OCache::Attend(kernels::Backend& b, const AttendArgs& a) {
  const std::vector<int32_t>& seq = *a.host_seq_ids;
  const std::vector<int32_t>& pos = *a.host_positions;
  const int n = static_cast<int>(seq.size());
  if (a.num_heads != heads_) return absl::InvalidArgumentError("H2O cache: head count differs from the model's");
  const int l = a.layer;
  const Device dev = b.device();
  // Place each token's heads in a free slot of their (row, head).
  std::vector<int32_t> slot_ids(static_cast<size_t>(n) * heads_);
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < heads_; ++h) {
      const size_t base = Index(l, seq[i], h);
      int free = -1;
      for (int j = 0; j < slots_ && free < 0; ++j) {
        if (!occupied_[base + j]) free = j;
      }
      FERRY_CHECK(free >= 0);  // eviction keeps one slot free after every step
      slot_ids[static_cast<size_t>(i) * heads_ + h] = free;
      position_[base + free] = pos[i];
      score_[base + free] = 0.0f;
      occupied_[base + free] = 1;
    }
  }
  const size_t layer_cells = static_cast<size_t>(rows_) * heads_ * slots_;
  const size_t layer_base = Index(l, 0, 0);
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(slot_ids_dev_.data(), slot_ids.data(), slot_ids.size() * sizeof(int32_t)));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(occupied_dev_[l].data(), occupied_.data() + layer_base, layer_cells));
  const TensorView k_slots = TensorView::Contiguous(k_[l].data(), DType::kF32, {rows_, heads_, slots_, head_dim_}, dev);
  const TensorView v_slots = TensorView::Contiguous(v_[l].data(), DType::kF32, {rows_, heads_, slots_, head_dim_}, dev);
  const TensorView slot_view = TensorView::Contiguous(slot_ids_dev_.data(), DType::kI32, {n, heads_}, dev);
  FERRY_RETURN_IF_ERROR(b.SlotKvWrite({a.k, a.v, k_slots, v_slots, a.seq_ids, slot_view}));
  const TensorView probs = TensorView::Contiguous(probs_dev_.data(), DType::kF32, {n, heads_, slots_}, dev);
  const TensorView occ = TensorView::Contiguous(occupied_dev_[l].data(), DType::kU8, {rows_, heads_, slots_}, dev);
  FERRY_RETURN_IF_ERROR(b.SlotAttention({a.q, k_slots, v_slots, occ, a.seq_ids, a.out, probs, a.scale}));
  probs_.resize(static_cast<size_t>(n) * heads_ * slots_);
  FERRY_RETURN_IF_ERROR(b.CopyToHost(probs_.data(), probs_dev_.data(), probs_.size() * sizeof(float)));
  // Accumulate, then evict down to the budget.
  const int budget = options_.heavy + options_.recent;
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < heads_; ++h) {
      const size_t base = Index(l, seq[i], h);
      const float* p = probs_.data() + (static_cast<size_t>(i) * heads_ + h) * slots_;
      int count = 0;
      for (int j = 0; j < slots_; ++j) {
        if (!occupied_[base + j]) continue;
        score_[base + j] += p[j];
        ++count;
      }
      if (count <= budget) continue;
      int victim = -1;
      for (int j = 0; j < slots_; ++j) {
        if (!occupied_[base + j]) continue;
        const int at = position_[base + j];
        if (at > pos[i] - options_.recent || at < options_.protect) continue;  // recent or protected
        if (victim < 0 || score_[base + j] < score_[base + victim] ||
            (score_[base + j] == score_[base + victim] && at < position_[base + victim])) {
          victim = j;
        }
      }
      FERRY_CHECK(victim >= 0);  // protect <= heavy leaves heavy + 1 - protect >= 1 candidates
      occupied_[base + victim] = 0;
      position_[base + victim] = -1;
      score_[base + victim] = 0.0f;
    }
  }
  return absl::OkStatus();
}

std::vector<int> H2OCache::Held(int layer, int row, int head) const {
  const size_t base = Index(layer, row, head);
  return std::vector<int>(position_.begin() + base, position_.begin() + base + slots_);
}

std::vector<float> H2OCache::Scores(int layer, int row, int head) const {
  const size_t base = Index(layer, row, head);
  return std::vector<float>(score_.begin() + base, score_.begin() + base + slots_);
}

}  // namespace ferry::offload
