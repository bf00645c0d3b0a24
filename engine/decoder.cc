// The one decoder program: embed, then per layer the attention block and the FFN block, then the
// head and the token choice, over any Backend. Family differences are branches on ModelConfig:
// LayerNorm or RMSNorm, learned or rotary positions, q/k norm, biases, ReLU or SwiGLU, pre- or
// post-norm. Micro-batches (FlexGen's GPU batches) run each layer's weights over every micro-batch
// in turn, so temporaries hold one micro-batch.
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "base/status.h"
#include "engine/model.h"
#include "engine/rope.h"

namespace ferry::engine {

using offload::Role;

struct Model::Scratch {
  Weight tokens, seq_ids, positions, rows;  // the call's ids on the device
  Weight h;                                 // [n, d] the residual stream
  Weight a, q, k, v, att, ffn, gate, e, tap;  // per micro-batch
  TensorView o;                             // [micro, d]: the attention block's and the FFN's output (q's memory when it fits)
  Weight freq, freq_rows;                   // rotary: inv_freq tables [tables, rotary_dim / 2] and each token's row
  float attention_scaling = 1.0f;
  std::vector<int64_t> ends;                // micro-batch ends
  std::vector<std::vector<int32_t>> host_seq, host_pos;
  bool tap_on = false;
  int64_t begin(int m) const { return m == 0 ? 0 : ends[m - 1]; }
  int64_t len(int m) const { return ends[m] - begin(m); }
};

uint64_t Model::ForwardWorkspaceBytes(const ModelConfig& c, int64_t n, int64_t r, int64_t micro) {
  if (micro <= 0 || micro > n) micro = n;
  const int64_t d = c.hidden_size, f = c.ffn_dim, w = c.word_embed_proj_dim, qw = c.q_width(), kw = c.kv_width();
  const bool swiglu = c.ffn == FfnKind::kSwiGlu;
  // ids and the residual stream h [n, d]; per micro-batch a [., d], q [., max(qw, d)] (the output
  // projection reuses it), k, v [., kw], att [., qw], ffn [., f] (and SwiGLU's gate), the embedding
  // projection and the CUDA GEMM input scratch (16-bit, [., max(d, f, qw)]); the head's rows,
  // projection and logits; the CUDA backend's GEMM split scratch, launch plans and sampling
  // scratch; rotary tables and rows; allocator slack.
  return static_cast<uint64_t>(n) * (16 + 4 * d) +
         static_cast<uint64_t>(micro) * (4 * (d + std::max(qw, d) + 2 * kw + qw) + 4 * f * (swiglu ? 2 : 1) + 4 * w +
                                         2 * std::max({f, d, qw})) +
         static_cast<uint64_t>(r) * 4 * (d + w + c.vocab_size) +
         // the CUDA GEMMs of <= 128 rows split their input (hi + lo, 16-bit) and write 2 rows each
         static_cast<uint64_t>(std::min<int64_t>(std::max(micro, r), 128)) *
             (4 * std::max({d, f, w, qw}) + 8 * std::max<int64_t>(f, c.vocab_size)) +
         // the CUDA attention launch plans
         static_cast<uint64_t>(n) * 4 * 12 +
         (c.learned_positions() ? 0 : static_cast<uint64_t>(n + 1) * (4 + 2 * static_cast<uint64_t>(c.rope.rotary_dim))) +
         // sampling on the GPU: sorted logits, ids in and out, cumulative sums (F64), the sort's temporaries
         static_cast<uint64_t>(r) * c.vocab_size * 32 + (2 << 20);
}

absl::Status Model::CheckBatch(const ForwardBatch& batch, std::vector<int64_t>* ends) const {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  if (n == 0) return absl::InvalidArgumentError("Forward: empty batch");
  if (batch.seq_ids.size() != batch.tokens.size() || batch.positions.size() != batch.tokens.size()) {
    return absl::InvalidArgumentError("Forward: tokens, seq_ids and positions differ in length");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", batch.tokens[i], " is outside the vocabulary of ", c.vocab_size));
    }
    if (batch.positions[i] < 0 || batch.positions[i] >= c.max_positions) {
      return absl::InvalidArgumentError(absl::StrCat("position ", batch.positions[i], " is beyond the model's context of ",
                                                     c.max_positions, " tokens"));
    }
  }
  for (int32_t row : batch.logit_rows) {
    if (row < 0 || row >= n) return absl::InvalidArgumentError("Forward: logit row out of range");
  }
  if (batch.ffn_hook != nullptr && c.ffn != FfnKind::kRelu) {
    return absl::InvalidArgumentError("the FFN hook (Deja Vu sparsity) needs a ReLU FFN; this model's FFN is SwiGLU");
  }
  for (int32_t e : batch.micro_batch_ends) ends->push_back(e);
  if (ends->empty() || ends->back() != n) ends->push_back(n);
  for (size_t m = 0; m < ends->size(); ++m) {
    const int64_t begin = m == 0 ? 0 : (*ends)[m - 1];
    if ((*ends)[m] <= begin || (*ends)[m] > n) return absl::InvalidArgumentError("Forward: micro-batch ends must increase up to n");
    if ((*ends)[m] < n && batch.seq_ids[(*ends)[m] - 1] == batch.seq_ids[(*ends)[m]]) {
      return absl::InvalidArgumentError("Forward: a micro-batch boundary splits a sequence");
    }
  }
  return absl::OkStatus();
}

absl::Status Model::Norm(const offload::LayerWeights& w, Role gamma, Role beta, const TensorView& in, const TensorView& out) {
  if (config_.norm == NormKind::kRmsNorm) return backend_->RmsNorm({in, w[gamma], out, config_.norm_eps});
  return backend_->LayerNorm({in, w[gamma], w[beta], out, config_.norm_eps});
}

absl::Status Model::AddNorm(const offload::LayerWeights& w, Role gamma, Role beta, const TensorView& residual,
                            const TensorView& delta, const TensorView& out) {
  if (config_.norm == NormKind::kRmsNorm) return backend_->AddRmsNorm({residual, delta, w[gamma], out, config_.norm_eps});
  return backend_->AddLayerNorm({residual, delta, w[gamma], w[beta], out, config_.norm_eps});
}

absl::Status Model::Rotate(const Scratch& s, int m, const TensorView& x, int heads) {
  const int64_t b = s.begin(m), e = s.ends[m];
  return backend_->Rope({x, s.positions.view.Rows(b, e), s.freq.view, s.freq_rows.view.Rows(b, e), heads, config_.rope.rotary_dim,
                         s.attention_scaling});
}

absl::Status Model::Embed(const Scratch& s, int64_t begin, int64_t end) {
  kernels::Backend& b = *backend_;
  const int64_t len = end - begin;
  const TensorView hm = s.h.view.Rows(begin, end), ids = s.tokens.view.Rows(begin, end);
  const TensorView& table = weights_.Global(Role::kTokEmbed);
  if (config_.has_projection()) {
    const TensorView em = s.e.view.Rows(0, len);
    FERRY_RETURN_IF_ERROR(b.GatherRows({table, ids, 0, em}));
    FERRY_RETURN_IF_ERROR(b.Linear({em, weights_.Global(Role::kProjectIn), TensorView{}, hm, false}));
  } else {
    FERRY_RETURN_IF_ERROR(b.GatherRows({table, ids, 0, hm}));
  }
  if (!config_.learned_positions()) return absl::OkStatus();
  const TensorView am = s.a.view.Rows(0, len);
  FERRY_RETURN_IF_ERROR(
      b.GatherRows({weights_.Global(Role::kPosEmbed), s.positions.view.Rows(begin, end), config_.position_offset, am}));
  return b.Add(hm, am, hm);
}

absl::Status Model::AttentionBlock(int l, const offload::LayerWeights& w, const Scratch& s, int m, offload::AttentionCache& cache) {
  kernels::Backend& b = *backend_;
  const ModelConfig& c = config_;
  const int64_t begin = s.begin(m), end = s.ends[m], len = s.len(m);
  const TensorView hm = s.h.view.Rows(begin, end), am = s.a.view.Rows(0, len), qm = s.q.view.Rows(0, len),
                   km = s.k.view.Rows(0, len), vm = s.v.view.Rows(0, len), attm = s.att.view.Rows(0, len),
                   om = s.o.Rows(0, len);
  const TensorView* attn_in = &hm;
  if (c.norm_before) {
    FERRY_RETURN_IF_ERROR(Norm(w, Role::kAttnNorm, Role::kAttnNormBias, hm, am));
    attn_in = &am;
  }
  if (s.tap_on) FERRY_RETURN_IF_ERROR(b.CopyTensor(*attn_in, s.tap.view.Rows(0, len)));
  FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, w[Role::kQ], w[Role::kQBias], qm, false}));
  FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, w[Role::kK], w[Role::kKBias], km, false}));
  FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, w[Role::kV], w[Role::kVBias], vm, false}));
  if (c.qk_norm) {  // RMSNorm over each head, before the rotation
    const int64_t hd = c.head_dim();
    const TensorView qh = TensorView::Contiguous(qm.data, DType::kF32, {len * c.num_heads, hd}, b.device());
    const TensorView kh = TensorView::Contiguous(km.data, DType::kF32, {len * c.num_kv_heads, hd}, b.device());
    FERRY_RETURN_IF_ERROR(b.RmsNorm({qh, w[Role::kQNorm], qh, c.norm_eps}));
    FERRY_RETURN_IF_ERROR(b.RmsNorm({kh, w[Role::kKNorm], kh, c.norm_eps}));
  }
  if (!c.learned_positions()) {
    FERRY_RETURN_IF_ERROR(Rotate(s, m, qm, c.num_heads));
    FERRY_RETURN_IF_ERROR(Rotate(s, m, km, c.num_kv_heads));
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim()));
  offload::AttendArgs args{l, qm, km, vm, s.seq_ids.view.Rows(begin, end), s.positions.view.Rows(begin, end),
                           &s.host_seq[m], &s.host_pos[m], attm, c.num_heads, scale, c.num_kv_heads};
  FERRY_RETURN_IF_ERROR(cache.Attend(b, args));
  FERRY_RETURN_IF_ERROR(b.Linear({attm, w[Role::kO], w[Role::kOBias], om, false}));
  // The residual add fused with the norm after it: the FFN's input norm (pre-norm), or the
  // attention block's output norm (post-norm, in place).
  if (c.norm_before) return AddNorm(w, Role::kFfnNorm, Role::kFfnNormBias, hm, om, am);
  return AddNorm(w, Role::kAttnNorm, Role::kAttnNormBias, hm, om, hm);
}

absl::Status Model::FfnBlock(int l, const offload::LayerWeights& w, const Scratch& s, int m, const ForwardBatch& batch) {
  kernels::Backend& b = *backend_;
  const ModelConfig& c = config_;
  const int64_t begin = s.begin(m), end = s.ends[m], len = s.len(m);
  const TensorView hm = s.h.view.Rows(begin, end), om = s.o.Rows(0, len);
  const TensorView ffn_in = c.norm_before ? s.a.view.Rows(0, len) : hm;
  if (bundles_ != nullptr) {
    // Deja Vu: only the chosen neurons' bundles cross the link and are computed.
    std::vector<int32_t> chosen;
    if (batch.ffn_select != nullptr) {
      FERRY_ASSIGN_OR_RETURN(chosen, (*batch.ffn_select)(l, s.tap.view.Rows(0, len)));
    } else {
      chosen.resize(static_cast<size_t>(c.ffn_dim));
      std::iota(chosen.begin(), chosen.end(), 0);
    }
    FERRY_ASSIGN_OR_RETURN(const TensorView bundles, bundles_->Gather(l, chosen));
    FERRY_RETURN_IF_ERROR(b.BundledFfn({ffn_in, bundles, w[Role::kDownBias], om}));
  } else {
    const TensorView ffnm = s.ffn.view.Rows(0, len);
    if (c.ffn == FfnKind::kSwiGlu) {
      const TensorView gm = s.gate.view.Rows(0, len);
      FERRY_RETURN_IF_ERROR(b.Linear({ffn_in, w[Role::kGate], w[Role::kGateBias], gm, false}));
      FERRY_RETURN_IF_ERROR(b.Linear({ffn_in, w[Role::kUp], w[Role::kUpBias], ffnm, false}));
      FERRY_RETURN_IF_ERROR(b.SiluMul({gm, ffnm, ffnm}));
    } else {
      FERRY_RETURN_IF_ERROR(b.Linear({ffn_in, w[Role::kUp], w[Role::kUpBias], ffnm, true}));
      if (batch.ffn_hook != nullptr) {
        FERRY_RETURN_IF_ERROR(b.Synchronize());
        FERRY_RETURN_IF_ERROR((*batch.ffn_hook)(l, s.tap.view.Rows(0, len), ffnm));
      }
    }
    FERRY_RETURN_IF_ERROR(b.Linear({ffnm, w[Role::kDown], w[Role::kDownBias], om, false}));
  }
  if (c.norm_before) return b.Add(hm, om, hm);  // the next norm is the next layer's
  return AddNorm(w, Role::kFfnNorm, Role::kFfnNormBias, hm, om, hm);
}

absl::Status Model::Head(const ForwardBatch& batch, const Scratch& s, std::vector<float>* logits) {
  kernels::Backend& b = *backend_;
  const ModelConfig& c = config_;
  const int64_t r = static_cast<int64_t>(batch.logit_rows.size()), d = c.hidden_size, w = c.word_embed_proj_dim;
  if (batch.argmax_ids != nullptr) {
    batch.argmax_ids->clear();
    logits->clear();
  } else {
    logits->assign(static_cast<size_t>(r) * c.vocab_size, 0.0f);
  }
  if (r == 0) return b.Synchronize();
  // Head over the requested rows only.
  FERRY_ASSIGN_OR_RETURN(Weight sel, Alloc(DType::kF32, {r, d}));
  FERRY_RETURN_IF_ERROR(b.GatherRows({s.h.view, s.rows.view, 0, sel.view}));
  if (c.final_norm) {
    offload::LayerWeights g;
    g[Role::kFinalNorm] = weights_.Global(Role::kFinalNorm);
    g[Role::kFinalNormBias] = weights_.Global(Role::kFinalNormBias);
    FERRY_RETURN_IF_ERROR(Norm(g, Role::kFinalNorm, Role::kFinalNormBias, sel.view, sel.view));
  }
  TensorView head_in = sel.view;
  Weight projected;
  if (c.has_projection()) {
    FERRY_ASSIGN_OR_RETURN(projected, Alloc(DType::kF32, {r, w}));
    FERRY_RETURN_IF_ERROR(b.Linear({sel.view, weights_.Global(Role::kProjectOut), TensorView{}, projected.view, false}));
    head_in = projected.view;
  }
  FERRY_ASSIGN_OR_RETURN(Weight out, Alloc(DType::kF32, {r, c.vocab_size}));
  const TensorView& head = c.tie_word_embeddings ? weights_.Global(Role::kTokEmbed) : weights_.Global(Role::kLmHead);
  FERRY_RETURN_IF_ERROR(b.Linear({head_in, head, TensorView{}, out.view, false}));
  if (batch.argmax_ids == nullptr) {
    FERRY_RETURN_IF_ERROR(b.CopyToHost(logits->data(), out.buffer.data(), logits->size() * sizeof(float)));
    return b.Synchronize();
  }
  for (int32_t row : batch.banned_rows) {
    if (row < 0 || row >= r) return absl::InvalidArgumentError("Forward: banned row out of range");
    for (int32_t token : batch.banned_tokens) {
      if (token < 0 || token >= c.vocab_size) continue;
      const float banned = -INFINITY;
      float* at = out.view.as<float>() + static_cast<int64_t>(row) * c.vocab_size + token;
      FERRY_RETURN_IF_ERROR(b.CopyToDevice(at, &banned, sizeof(float)));
    }
  }
  FERRY_ASSIGN_OR_RETURN(Weight ids, Alloc(DType::kI32, {r}));
  if (!batch.sample_uniforms.empty()) {
    if (static_cast<int64_t>(batch.sample_uniforms.size()) != r) {
      return absl::InvalidArgumentError("Forward: sampling needs one uniform draw per logit row");
    }
    FERRY_RETURN_IF_ERROR(b.SampleRows({out.view, batch.sample_uniforms.data(), batch.sample, ids.view}));
  } else {
    FERRY_RETURN_IF_ERROR(b.ArgMaxRows(out.view, ids.view));
  }
  batch.argmax_ids->resize(static_cast<size_t>(r));
  FERRY_RETURN_IF_ERROR(b.CopyToHost(batch.argmax_ids->data(), ids.buffer.data(), r * sizeof(int32_t)));
  return b.Synchronize();
}

absl::Status Model::Forward(const ForwardBatch& batch, offload::AttentionCache& cache, std::vector<float>* logits) {
  const ModelConfig& c = config_;
  Scratch s;
  FERRY_RETURN_IF_ERROR(CheckBatch(batch, &s.ends));
  FERRY_RETURN_IF_ERROR(cache.Check(batch.seq_ids, batch.positions));
  kernels::Backend& b = *backend_;
  const int64_t n = static_cast<int64_t>(batch.tokens.size()), r = static_cast<int64_t>(batch.logit_rows.size());
  const int64_t d = c.hidden_size, qw = c.q_width(), kw = c.kv_width();
  int64_t micro = 0;
  for (size_t m = 0; m < s.ends.size(); ++m) micro = std::max(micro, s.len(static_cast<int>(m)));

  // Inputs to the device.
  FERRY_ASSIGN_OR_RETURN(s.tokens, Alloc(DType::kI32, {n}));
  FERRY_ASSIGN_OR_RETURN(s.seq_ids, Alloc(DType::kI32, {n}));
  FERRY_ASSIGN_OR_RETURN(s.positions, Alloc(DType::kI32, {n}));
  FERRY_ASSIGN_OR_RETURN(s.rows, Alloc(DType::kI32, {std::max<int64_t>(r, 1)}));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(s.tokens.buffer.data(), batch.tokens.data(), n * 4));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(s.seq_ids.buffer.data(), batch.seq_ids.data(), n * 4));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(s.positions.buffer.data(), batch.positions.data(), n * 4));
  if (r > 0) FERRY_RETURN_IF_ERROR(b.CopyToDevice(s.rows.buffer.data(), batch.logit_rows.data(), r * 4));
  if (!c.learned_positions()) {
    // One table of frequencies, or with dynamic NTK one per distinct sequence length in the call
    // (a sequence's length: its last position in the call + 1), so each token's rotation depends
    // only on its own sequence.
    std::vector<int32_t> rows(static_cast<size_t>(n), 0);
    std::vector<float> tables;
    if (c.rope.kind == RopeKind::kDynamic) {
      std::map<int32_t, int32_t> seq_len;
      for (int64_t i = 0; i < n; ++i) seq_len[batch.seq_ids[i]] = std::max(seq_len[batch.seq_ids[i]], batch.positions[i] + 1);
      std::map<int32_t, int32_t> table_of;  // length -> table row
      for (int64_t i = 0; i < n; ++i) {
        const int32_t len = std::max(seq_len[batch.seq_ids[i]], c.rope.original_max_positions);  // the original frequencies below it
        auto [it, fresh] = table_of.try_emplace(len, static_cast<int32_t>(table_of.size()));
        if (fresh) {
          const RopeFrequencies f = ComputeRopeFrequencies(c.rope, len);
          tables.insert(tables.end(), f.inv_freq.begin(), f.inv_freq.end());
        }
        rows[i] = it->second;
      }
    } else {
      const RopeFrequencies f = ComputeRopeFrequencies(c.rope, 0);
      tables = f.inv_freq;
      s.attention_scaling = f.attention_scaling;
    }
    const int64_t half = c.rope.rotary_dim / 2, count = static_cast<int64_t>(tables.size()) / half;
    FERRY_ASSIGN_OR_RETURN(s.freq, Alloc(DType::kF32, {count, half}));
    FERRY_ASSIGN_OR_RETURN(s.freq_rows, Alloc(DType::kI32, {n}));
    FERRY_RETURN_IF_ERROR(b.CopyToDevice(s.freq.buffer.data(), tables.data(), tables.size() * sizeof(float)));
    FERRY_RETURN_IF_ERROR(b.CopyToDevice(s.freq_rows.buffer.data(), rows.data(), rows.size() * sizeof(int32_t)));
  }

  FERRY_ASSIGN_OR_RETURN(s.h, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(s.a, Alloc(DType::kF32, {micro, d}));
  FERRY_ASSIGN_OR_RETURN(s.q, Alloc(DType::kF32, {micro, std::max(qw, d)}));
  s.q.view = MakeView(s.q.buffer.data(), DType::kF32, {micro, qw}, b.device());
  s.o = MakeView(s.q.buffer.data(), DType::kF32, {micro, d}, b.device());  // q is dead once attention has read it
  FERRY_ASSIGN_OR_RETURN(s.k, Alloc(DType::kF32, {micro, kw}));
  FERRY_ASSIGN_OR_RETURN(s.v, Alloc(DType::kF32, {micro, kw}));
  FERRY_ASSIGN_OR_RETURN(s.att, Alloc(DType::kF32, {micro, qw}));
  if (bundles_ == nullptr) {  // sparse: BundledFfn keeps its activations in its own scratch of at most this size
    FERRY_ASSIGN_OR_RETURN(s.ffn, Alloc(DType::kF32, {micro, c.ffn_dim}));
    if (c.ffn == FfnKind::kSwiGlu) {
      FERRY_ASSIGN_OR_RETURN(s.gate, Alloc(DType::kF32, {micro, c.ffn_dim}));
    }
  }
  s.tap_on = batch.ffn_hook != nullptr || (bundles_ != nullptr && batch.ffn_select != nullptr);
  if (s.tap_on) {
    FERRY_ASSIGN_OR_RETURN(s.tap, Alloc(DType::kF32, {micro, d}));
  }
  if (c.has_projection()) {
    FERRY_ASSIGN_OR_RETURN(s.e, Alloc(DType::kF32, {micro, c.word_embed_proj_dim}));
  }
  s.host_seq.resize(s.ends.size());
  s.host_pos.resize(s.ends.size());
  for (size_t m = 0; m < s.ends.size(); ++m) {
    const int64_t begin = s.begin(static_cast<int>(m));
    s.host_seq[m].assign(batch.seq_ids.begin() + begin, batch.seq_ids.begin() + s.ends[m]);
    s.host_pos[m].assign(batch.positions.begin() + begin, batch.positions.begin() + s.ends[m]);
  }

  for (size_t m = 0; m < s.ends.size(); ++m) FERRY_RETURN_IF_ERROR(Embed(s, s.begin(static_cast<int>(m)), s.ends[m]));
  for (int l = 0; l < c.num_layers; ++l) {
    FERRY_ASSIGN_OR_RETURN(const offload::LayerWeights w, weights_.Acquire(l, b));
    for (int m = 0; m < static_cast<int>(s.ends.size()); ++m) {
      FERRY_RETURN_IF_ERROR(AttentionBlock(l, w, s, m, cache));
      FERRY_RETURN_IF_ERROR(FfnBlock(l, w, s, m, batch));
    }
    FERRY_RETURN_IF_ERROR(weights_.Release(l, b));
  }
  return Head(batch, s, logits);
}

}  // namespace ferry::engine
