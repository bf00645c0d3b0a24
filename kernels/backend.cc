#include "kernels/backend.h"

#include "absl/strings/str_cat.h"

namespace ferry::kernels {

DeviceBuffer::~DeviceBuffer() { Release(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : owner_(o.owner_), data_(o.data_), bytes_(o.bytes_), host_(o.host_) {
  o.owner_ = nullptr;
  o.data_ = nullptr;
  o.bytes_ = 0;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Release();
    owner_ = o.owner_;
    data_ = o.data_;
    bytes_ = o.bytes_;
    host_ = o.host_;
    o.owner_ = nullptr;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::Release() {
  if (owner_ != nullptr && data_ != nullptr) owner_->Free(data_, bytes_, host_);
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

namespace {

absl::Status Expect(bool ok, const char* op, const std::string& what) {
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
}

bool IsFloat(DType d) { return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16; }

bool Is2dF32(const TensorView& t) { return t.ndim == 2 && t.dtype == DType::kF32 && t.is_contiguous(); }

bool IsIds(const TensorView& t, int64_t n) {
  return t.ndim == 1 && t.dtype == DType::kI32 && t.shape[0] == n && t.is_contiguous();
}

}  // namespace

absl::Status ValidateGatherRows(const GatherRowsArgs& a) {
  const char* op = "GatherRows";
  FERRY_RETURN_IF_ERROR(Expect(a.table.ndim == 2 && IsFloat(a.table.dtype) && a.table.is_contiguous(), op,
                               "table must be a contiguous 2-D float tensor"));
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.out), op, "out must be contiguous [n, dim] F32"));
  FERRY_RETURN_IF_ERROR(Expect(a.out.shape[1] == a.table.shape[1], op,
                               absl::StrCat("dim mismatch: table ", a.table.ShapeString(), " out ", a.out.ShapeString())));
  return Expect(IsIds(a.ids, a.out.shape[0]), op, "ids must be [n] I32 with n = out rows");
}

absl::Status ValidateLayerNorm(const LayerNormArgs& a) {
  const char* op = "LayerNorm";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.in) && Is2dF32(a.out) && a.in.shape == a.out.shape, op,
                               "in and out must be contiguous [n, dim] F32 of one shape"));
  const int64_t dim = a.in.shape[1];
  for (const TensorView* p : {&a.gamma, &a.beta}) {
    FERRY_RETURN_IF_ERROR(Expect(p->ndim == 1 && p->shape[0] == dim && p->dtype == DType::kF32, op,
                                 absl::StrCat("gamma and beta must be [", dim, "] F32")));
  }
  return absl::OkStatus();
}

absl::Status ValidateLinear(const LinearArgs& a) {
  const char* op = "Linear";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.in) && Is2dF32(a.out), op, "in and out must be contiguous 2-D F32"));
  if (a.weight.quant) {
    FERRY_RETURN_IF_ERROR(Expect(a.weight.ndim == 2 && a.weight.dtype == DType::kU8, op, "a quantized weight must be a 2-D U8 region"));
    auto layout = LayoutQuantized(*a.weight.quant, a.weight.shape[0], a.weight.shape[1]);
    FERRY_RETURN_IF_ERROR(Expect(layout.ok(), op, layout.ok() ? "" : std::string(layout.status().message())));
  } else {
    FERRY_RETURN_IF_ERROR(Expect(a.weight.ndim == 2 && IsFloat(a.weight.dtype) && a.weight.is_contiguous(), op,
                                 "weight must be a contiguous 2-D float tensor"));
  }
  FERRY_RETURN_IF_ERROR(Expect(a.in.shape[1] == a.weight.shape[1] && a.out.shape[0] == a.in.shape[0] &&
                                   a.out.shape[1] == a.weight.shape[0],
                               op,
                               absl::StrCat("shapes do not chain: in ", a.in.ShapeString(), " weight ",
                                            a.weight.ShapeString(), " out ", a.out.ShapeString())));
  if (a.bias.data != nullptr) {
    FERRY_RETURN_IF_ERROR(Expect(a.bias.ndim == 1 && a.bias.shape[0] == a.weight.shape[0] && a.bias.dtype == DType::kF32,
                                 op, "bias must be [m] F32"));
  }
  return Expect(a.in.data != a.out.data, op, "out must not alias in");
}

absl::Status ValidateCopy(const TensorView& src, const TensorView& dst) {
  return Expect(src.dtype == dst.dtype && src.ndim == dst.ndim && src.shape == dst.shape && src.is_contiguous() &&
                    dst.is_contiguous(),
                "CopyTensor", "src and dst must be contiguous, of one shape and dtype");
}

absl::Status ValidateAdd(const TensorView& a, const TensorView& b, const TensorView& out) {
  return Expect(Is2dF32(a) && Is2dF32(b) && Is2dF32(out) && a.shape == b.shape && a.shape == out.shape, "Add",
                "a, b and out must be contiguous 2-D F32 of one shape");
}

namespace {

bool IsKvType(DType t) { return t == DType::kF32 || t == DType::kF16; }

// A cache tensor: F32/F16, or a q8/q4 region (U8) whose groups tile its last dimension and each
// `span` (a head's head_dim) of it.
bool IsKvTensor(const TensorView& t, int64_t span) {
  if (!t.quant) return IsKvType(t.dtype);
  if (t.dtype != DType::kU8 || t.ndim < 2 || t.shape[t.ndim - 1] % t.quant->group != 0 || span % t.quant->group != 0) return false;
  return LayoutQuantized(*t.quant, t.numel() / t.shape[t.ndim - 1], t.shape[t.ndim - 1]).ok();
}

absl::Status ValidateCacheAccess(const char* op, const TensorView& k_cache, const TensorView& v_cache,
                                 const TensorView& seq_ids, const TensorView& positions, int64_t n, int64_t width,
                                 int64_t head_dim) {
  FERRY_RETURN_IF_ERROR(Expect(k_cache.ndim == 3 && IsKvTensor(k_cache, head_dim) && k_cache.is_contiguous() &&
                                   v_cache.shape == k_cache.shape && v_cache.dtype == k_cache.dtype &&
                                   v_cache.quant == k_cache.quant && v_cache.is_contiguous(),
                               op, "k_cache and v_cache must be contiguous [seqs, max_len, width] F32, F16 or q8/q4 (groups "
                                   "within a head) of one shape and type"));
  FERRY_RETURN_IF_ERROR(Expect(k_cache.shape[2] == width, op,
                               absl::StrCat("cache width ", k_cache.shape[2], " != ", width)));
  FERRY_RETURN_IF_ERROR(Expect(IsIds(seq_ids, n) && IsIds(positions, n), op, "seq_ids and positions must be [n] I32"));
  return absl::OkStatus();
}

}  // namespace

QuantLayout KvQuantLayout(const TensorView& t) {
  const int64_t cols = t.shape[t.ndim - 1];
  auto layout = LayoutQuantized(*t.quant, t.numel() / cols, cols);
  FERRY_CHECK(layout.ok());  // the Validate functions checked it
  return *layout;
}

absl::Status ValidateKvWrite(const KvWriteArgs& a) {
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.k) && Is2dF32(a.v) && a.k.shape == a.v.shape, "KvWrite",
                               "k and v must be contiguous [n, width] F32 of one shape"));
  return ValidateCacheAccess("KvWrite", a.k_cache, a.v_cache, a.seq_ids, a.positions, a.k.shape[0], a.k.shape[1], a.k.shape[1]);
}

absl::Status ValidateAttention(const AttentionArgs& a) {
  const char* op = "Attention";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.q) && Is2dF32(a.out) && a.q.shape == a.out.shape, op,
                               "q and out must be contiguous [n, heads * head_dim] F32"));
  FERRY_RETURN_IF_ERROR(Expect(a.num_heads > 0 && a.q.shape[1] % a.num_heads == 0, op,
                               absl::StrCat("width ", a.q.shape[1], " is not a multiple of ", a.num_heads, " heads")));
  FERRY_RETURN_IF_ERROR(Expect(a.q.data != a.out.data, op, "out must not alias q"));
  const int64_t kv_heads = a.kv_heads(), head_dim = a.q.shape[1] / a.num_heads;
  FERRY_RETURN_IF_ERROR(Expect(kv_heads > 0 && a.num_heads % kv_heads == 0, op,
                               absl::StrCat(a.num_heads, " query heads are not a multiple of ", kv_heads, " KV heads")));
  if (a.col_sums.data != nullptr) {
    FERRY_RETURN_IF_ERROR(Expect(a.col_sums.ndim == 3 && a.col_sums.dtype == DType::kF32 &&
                                     a.col_sums.shape[0] == a.k_cache.shape[0] && a.col_sums.shape[1] == a.num_heads &&
                                     a.col_sums.shape[2] == a.k_cache.shape[1],
                                 op, "col_sums must be [seqs, heads, max_len] F32"));
  }
  return ValidateCacheAccess(op, a.k_cache, a.v_cache, a.seq_ids, a.positions, a.q.shape[0], kv_heads * head_dim, head_dim);
}

namespace {

// `width` is the rows' width; it must hold a whole multiple (the query group) of kv_heads x head_dim.
absl::Status ValidateSlots(const char* op, const TensorView& k_slots, const TensorView& v_slots, const TensorView& seq_ids,
                           int64_t n, int64_t width) {
  FERRY_RETURN_IF_ERROR(Expect(k_slots.ndim == 4 && IsKvTensor(k_slots, k_slots.shape[3]) && k_slots.is_contiguous() &&
                                   v_slots.shape == k_slots.shape && v_slots.dtype == k_slots.dtype &&
                                   v_slots.quant == k_slots.quant && v_slots.is_contiguous(),
                               op, "k_slots and v_slots must be contiguous [seqs, kv_heads, slots, head_dim] F32, F16 or q8/q4 of one type"));
  const int64_t kv_width = k_slots.shape[1] * k_slots.shape[3];
  FERRY_RETURN_IF_ERROR(Expect(kv_width > 0 && width % kv_width == 0, op,
                               "the width must be a multiple of kv_heads x head_dim"));
  return Expect(IsIds(seq_ids, n), op, "seq_ids must be [n] I32");
}

}  // namespace

absl::Status ValidateBundledFfn(const BundledFfnArgs& a) {
  const char* op = "BundledFfn";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.x) && Is2dF32(a.out) && a.x.shape == a.out.shape && a.x.data != a.out.data, op,
                               "x and out must be distinct contiguous [n, d] F32"));
  const int64_t d = a.x.shape[1];
  if (a.bundles.quant) {
    auto layout = LayoutQuantBundle(*a.bundles.quant, d);
    FERRY_RETURN_IF_ERROR(Expect(layout.ok() && a.bundles.ndim == 2 && a.bundles.dtype == DType::kU8 && a.bundles.is_contiguous() &&
                                     a.bundles.shape[1] == static_cast<int64_t>(layout.ok() ? layout->bytes : 0),
                                 op, absl::StrCat("quantized bundles must be [m, bundle bytes] U8 of ", QuantFormatName(*a.bundles.quant),
                                                  " bundles of width ", d, " (the group dividing it)")));
  } else {
    FERRY_RETURN_IF_ERROR(Expect(a.bundles.ndim == 2 && IsFloat(a.bundles.dtype) && a.bundles.is_contiguous() &&
                                     a.bundles.shape[1] >= 2 * d + 1,
                                 op, absl::StrCat("bundles must be [m, >= ", 2 * d + 1, "] float")));
  }
  if (a.fc2_bias.data != nullptr) {
    FERRY_RETURN_IF_ERROR(Expect(a.fc2_bias.ndim == 1 && a.fc2_bias.shape[0] == d && a.fc2_bias.dtype == DType::kF32, op,
                                 "fc2_bias must be [d] F32"));
  }
  return absl::OkStatus();
}

absl::Status ValidateArgMaxRows(const TensorView& logits, const TensorView& ids) {
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(logits) && logits.shape[1] > 0, "ArgMaxRows", "logits must be [rows, vocab] F32"));
  return Expect(IsIds(ids, logits.shape[0]), "ArgMaxRows", "ids must be [rows] I32");
}

absl::Status ValidateSlotKvWrite(const SlotKvWriteArgs& a) {
  const char* op = "SlotKvWrite";
  FERRY_RETURN_IF_ERROR(Expect(a.k.ndim == 2 && a.k.is_contiguous() && a.v.is_contiguous() && a.k.shape == a.v.shape &&
                                   IsKvType(a.k.dtype) && a.v.dtype == a.k.dtype,
                               op, "k and v must be contiguous [n, width] F32 or F16"));
  FERRY_RETURN_IF_ERROR(ValidateSlots(op, a.k_slots, a.v_slots, a.seq_ids, a.k.shape[0], a.k.shape[1]));
  FERRY_RETURN_IF_ERROR(Expect(a.k.shape[1] == a.k_slots.shape[1] * a.k_slots.shape[3], op, "k's width must be kv_heads x head_dim"));
  return Expect(a.slot_ids.ndim == 2 && a.slot_ids.dtype == DType::kI32 && a.slot_ids.shape[0] == a.k.shape[0] &&
                    a.slot_ids.shape[1] == a.k_slots.shape[1] && a.slot_ids.is_contiguous(),
                op, "slot_ids must be [n, heads] I32");
}

absl::Status ValidateSlotAttention(const SlotAttentionArgs& a) {
  const char* op = "SlotAttention";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.q) && Is2dF32(a.out) && a.q.shape == a.out.shape && a.q.data != a.out.data, op,
                               "q and out must be distinct [n, width] F32"));
  FERRY_RETURN_IF_ERROR(ValidateSlots(op, a.k_slots, a.v_slots, a.seq_ids, a.q.shape[0], a.q.shape[1]));
  const auto& ks = a.k_slots.shape;
  FERRY_RETURN_IF_ERROR(Expect(a.occupied.ndim == 3 && a.occupied.dtype == DType::kU8 && a.occupied.shape[0] == ks[0] &&
                                   a.occupied.shape[1] == ks[1] && a.occupied.shape[2] == ks[2],
                               op, "occupied must be [seqs, heads, slots] U8"));
  return Expect(a.probs.ndim == 3 && a.probs.dtype == DType::kF32 && a.probs.shape[0] == a.q.shape[0] &&
                    a.probs.shape[1] * ks[3] == a.q.shape[1] && a.probs.shape[2] == ks[2] && a.probs.is_contiguous(),
                op, "probs must be [n, heads, slots] F32");
}

namespace {

absl::Status ValidateH2OState(const char* op, const TensorView& seq_ids, const TensorView& positions, const TensorView& slot_pos,
                              const TensorView& scores, const TensorView& occupied) {
  FERRY_RETURN_IF_ERROR(Expect(slot_pos.ndim == 3 && slot_pos.dtype == DType::kI32 && slot_pos.is_contiguous(), op,
                               "slot_pos must be [seqs, heads, slots] I32"));
  FERRY_RETURN_IF_ERROR(Expect(scores.shape == slot_pos.shape && scores.dtype == DType::kF32 && scores.is_contiguous() &&
                                   occupied.shape == slot_pos.shape && occupied.dtype == DType::kU8 && occupied.is_contiguous(),
                               op, "scores (F32) and occupied (U8) must have slot_pos's shape"));
  FERRY_RETURN_IF_ERROR(Expect(seq_ids.ndim == 1 && IsIds(seq_ids, seq_ids.shape[0]), op, "seq_ids must be [n] I32"));
  return Expect(IsIds(positions, seq_ids.shape[0]), op, "positions must be [n] I32");
}

}  // namespace

absl::Status ValidateH2OPlace(const H2OPlaceArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OState("H2OPlace", a.seq_ids, a.positions, a.slot_pos, a.scores, a.occupied));
  return Expect(a.slot_ids.ndim == 2 && a.slot_ids.dtype == DType::kI32 && a.slot_ids.shape[0] == a.seq_ids.shape[0] &&
                    a.slot_ids.shape[1] == a.slot_pos.shape[1] && a.slot_ids.is_contiguous(),
                "H2OPlace", "slot_ids must be [n, heads] I32");
}

absl::Status ValidateH2OUpdate(const H2OUpdateArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OState("H2OUpdate", a.seq_ids, a.positions, a.slot_pos, a.scores, a.occupied));
  FERRY_RETURN_IF_ERROR(Expect(a.probs.ndim == 3 && a.probs.dtype == DType::kF32 && a.probs.is_contiguous() &&
                                   a.probs.shape[0] == a.seq_ids.shape[0] && a.probs.shape[1] % a.slot_pos.shape[1] == 0 &&
                                   a.probs.shape[2] == a.slot_pos.shape[2],
                               "H2OUpdate", "probs must be [n, heads, slots] F32, heads a multiple of the KV heads"));
  return Expect(a.budget >= 1 && a.recent >= 0 && a.protect >= 0, "H2OUpdate", "budget must be >= 1, recent and protect >= 0");
}

absl::Status ValidateH2OPrefill(const H2OPrefillArgs& a) {
  const char* op = "H2OPrefill";
  FERRY_RETURN_IF_ERROR(Expect(a.col_sums.ndim == 3 && a.col_sums.dtype == DType::kF32 && a.col_sums.is_contiguous(), op,
                               "col_sums must be [used, heads, max_len] F32"));
  const int64_t used = a.col_sums.shape[0], max_len = a.col_sums.shape[2];
  FERRY_RETURN_IF_ERROR(ValidateH2OState(op, a.lengths, a.rows, a.slot_pos, a.scores, a.occupied));
  FERRY_RETURN_IF_ERROR(Expect(a.lengths.shape[0] == used && a.col_sums.shape[1] % a.slot_pos.shape[1] == 0, op,
                               "lengths and rows must be [used] and the head counts must agree"));
  FERRY_RETURN_IF_ERROR(Expect(a.token_slot.ndim == 2 && a.token_slot.dtype == DType::kI32 && a.token_slot.is_contiguous() &&
                                   a.token_slot.shape[0] == used * max_len && a.token_slot.shape[1] == a.slot_pos.shape[1],
                               op, "token_slot must be [used * max_len, heads] I32"));
  return Expect(a.heavy >= 0 && a.recent >= 0 && a.protect >= 0 && a.protect <= a.heavy &&
                    a.heavy + a.recent < a.slot_pos.shape[2],
                op, "needs 0 <= protect <= heavy and heavy + recent < slots");
}

absl::Status ValidateRmsNorm(const RmsNormArgs& a) {
  const char* op = "RmsNorm";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.in) && Is2dF32(a.out) && a.in.shape == a.out.shape, op,
                               "in and out must be contiguous [n, dim] F32 of one shape"));
  return Expect(a.gamma.ndim == 1 && a.gamma.shape[0] == a.in.shape[1] && a.gamma.dtype == DType::kF32, op,
                absl::StrCat("gamma must be [", a.in.shape[1], "] F32"));
}

absl::Status ValidateAddRmsNorm(const AddRmsNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAdd(a.residual, a.delta, a.residual));
  return ValidateRmsNorm({a.residual, a.gamma, a.out, a.eps});
}

absl::Status ValidateRope(const RopeArgs& a) {
  const char* op = "Rope";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.x) && a.num_heads > 0 && a.x.shape[1] % a.num_heads == 0, op,
                               "x must be contiguous [n, heads * head_dim] F32"));
  const int64_t head_dim = a.x.shape[1] / a.num_heads;
  FERRY_RETURN_IF_ERROR(Expect(a.rotary_dim > 0 && a.rotary_dim % 2 == 0 && a.rotary_dim <= head_dim, op,
                               absl::StrCat("rotary_dim ", a.rotary_dim, " must be even and in (0, ", head_dim, "]")));
  FERRY_RETURN_IF_ERROR(Expect(IsIds(a.positions, a.x.shape[0]), op, "positions must be [n] I32"));
  FERRY_RETURN_IF_ERROR(Expect(a.inv_freq.ndim == 2 && a.inv_freq.dtype == DType::kF32 && a.inv_freq.is_contiguous() &&
                                   a.inv_freq.shape[0] >= 1 && a.inv_freq.shape[1] == a.rotary_dim / 2,
                               op, absl::StrCat("inv_freq must be [tables, ", a.rotary_dim / 2, "] F32")));
  if (a.freq_rows.data == nullptr) return absl::OkStatus();
  return Expect(IsIds(a.freq_rows, a.x.shape[0]), op, "freq_rows must be [n] I32");
}

absl::Status ValidateSiluMul(const SiluMulArgs& a) {
  return Expect(Is2dF32(a.gate) && Is2dF32(a.up) && Is2dF32(a.out) && a.gate.shape == a.up.shape && a.out.shape == a.gate.shape,
                "SiluMul", "gate, up and out must be contiguous [n, f] F32 of one shape");
}

absl::Status ValidateAddLayerNorm(const AddLayerNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAdd(a.residual, a.delta, a.residual));
  return ValidateLayerNorm({a.residual, a.gamma, a.beta, a.out, a.eps});
}

absl::Status ValidateSampleRows(const SampleRowsArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateArgMaxRows(a.logits, a.ids));
  FERRY_RETURN_IF_ERROR(Expect(a.uniforms != nullptr || a.logits.shape[0] == 0, "SampleRows", "needs one uniform draw per row"));
  return Expect(a.params.temperature > 0.0f && a.params.top_k >= 0 && a.params.top_p > 0.0f && a.params.top_p <= 1.0f,
                "SampleRows", "needs temperature > 0, top_k >= 0 and top_p in (0, 1]");
}

absl::Status ValidateMatMul(const MatMulArgs& a) {
  const char* op = "MatMul";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.a) && Is2dF32(a.b) && Is2dF32(a.out), op, "a, b and out must be contiguous 2-D F32"));
  const int64_t m = a.trans_a ? a.a.shape[1] : a.a.shape[0], k = a.trans_a ? a.a.shape[0] : a.a.shape[1];
  const int64_t kb = a.trans_b ? a.b.shape[1] : a.b.shape[0], n = a.trans_b ? a.b.shape[0] : a.b.shape[1];
  FERRY_RETURN_IF_ERROR(Expect(k == kb && a.out.shape[0] == m && a.out.shape[1] == n, op,
                               absl::StrCat("shapes do not chain: [", m, ", ", k, "] x [", kb, ", ", n, "] -> [", a.out.shape[0], ", ",
                                            a.out.shape[1], "]")));
  FERRY_RETURN_IF_ERROR(Expect(a.out.data != a.a.data && a.out.data != a.b.data, op, "out must not alias a or b"));
  if (a.bias.data != nullptr) {
    FERRY_RETURN_IF_ERROR(Expect(a.bias.ndim == 1 && a.bias.dtype == DType::kF32 && a.bias.shape[0] == n, op, "bias must be [N] F32"));
  }
  return absl::OkStatus();
}

absl::Status ValidateBceGrad(const BceGradArgs& a) {
  const char* op = "BceGrad";
  FERRY_RETURN_IF_ERROR(Expect(Is2dF32(a.z) && Is2dF32(a.grad) && a.z.shape == a.grad.shape, op, "z and grad must be [B, F] F32"));
  const int64_t rows = a.z.shape[0], f = a.z.shape[1];
  FERRY_RETURN_IF_ERROR(Expect(a.labels.ndim == 2 && a.labels.dtype == DType::kU8 && a.labels.is_contiguous() &&
                                   a.labels.shape[0] == rows && a.labels.shape[1] == (f + 7) / 8,
                               op, "labels must be [B, ceil(F / 8)] U8"));
  return Expect(a.grad_bias.ndim == 1 && a.grad_bias.dtype == DType::kF32 && a.grad_bias.shape[0] == f, op, "grad_bias must be [F] F32");
}

absl::Status ValidateAdam(const AdamArgs& a) {
  const int64_t n = a.w.numel();
  for (const TensorView* t : {&a.w, &a.g, &a.m, &a.v}) {
    FERRY_RETURN_IF_ERROR(Expect(t->dtype == DType::kF32 && t->is_contiguous() && t->numel() == n, "AdamStep",
                                 "w, g, m and v must be contiguous F32 of one size"));
  }
  return Expect(a.c1 > 0.0f && a.c2 > 0.0f, "AdamStep", "bias corrections must be positive");
}

}  // namespace ferry::kernels
