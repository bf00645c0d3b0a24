// OptModel: loading a resident model, the layer program (Forward) and the dense KV cache. The
// offloaded side (store, plan, sparse FFN bundles) is in opt_model_offload.cc.
#include "engine/opt_model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "engine/opt_model_internal.h"
#include "io/store.h"

namespace ferry::engine {
namespace {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

TensorView MakeView(void* data, DType dtype, const std::vector<int64_t>& shape, Device device) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    stride *= shape[d];
  }
  return v;
}

absl::StatusOr<KvCache> KvCache::Create(kernels::Backend& backend, const OptConfig& config, int rows, int max_len,
                                        DType kv_dtype) {
  if (rows <= 0 || max_len <= 0) return absl::InvalidArgumentError("KV cache needs at least one row and one slot");
  if (kv_dtype != DType::kF32 && kv_dtype != DType::kF16) return absl::InvalidArgumentError("KV cache: F32 or F16");
  KvCache cache;
  cache.rows_ = rows;
  cache.max_len_ = max_len;
  const std::vector<int64_t> shape = {rows, max_len, config.hidden_size};
  const size_t bytes = static_cast<size_t>(rows) * max_len * config.hidden_size * DTypeSize(kv_dtype);
  for (int l = 0; l < config.num_layers; ++l) {
    for (auto* list : {&cache.k_, &cache.v_}) {
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend.Allocate(bytes));
      TensorView view = MakeView(buf.data(), kv_dtype, shape, backend.device());
      list->push_back(Weight{std::move(buf), view});
    }
  }
  return cache;
}

absl::Status KvCache::Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const {
  return offload::CheckDenseCacheBounds(seq_ids, positions, rows_, max_len_, "KV cache");
}

absl::Status KvCache::Attend(kernels::Backend& b, const offload::AttendArgs& a) {
  FERRY_RETURN_IF_ERROR(b.KvWrite({a.k, a.v, k(a.layer), v(a.layer), a.seq_ids, a.positions}));
  kernels::AttentionArgs args{a.q, k(a.layer), v(a.layer), a.seq_ids, a.positions, a.out, a.num_heads, a.scale, TensorView{}};
  if (a.host_seq_ids != nullptr && a.host_positions != nullptr) {
    args.host_seq_ids = a.host_seq_ids->data();
    args.host_positions = a.host_positions->data();
  }
  return b.Attention(args);
}

absl::StatusOr<Weight> AllocWeight(kernels::Backend& backend, DType dtype, std::initializer_list<int64_t> shape) {
  const std::vector<int64_t> dims(shape);
  size_t bytes = DTypeSize(dtype);
  for (int64_t d : dims) bytes *= static_cast<size_t>(d);
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend.Allocate(bytes));
  TensorView view = MakeView(buf.data(), dtype, dims, backend.device());
  return Weight{std::move(buf), view};
}

absl::StatusOr<Weight> OptModel::Alloc(DType dtype, std::initializer_list<int64_t> shape) const {
  return AllocWeight(*backend_, dtype, shape);
}

absl::StatusOr<Weight> OptModel::LoadTensor(const io::TensorSource& ckpt, const std::string& name,
                                            const std::vector<int64_t>& shape, bool as_f32) {
  const io::TensorInfo* info = ckpt.Find(name);
  if (info == nullptr) return absl::NotFoundError(absl::StrCat("checkpoint lacks tensor \"", name, "\""));
  if (info->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" has shape ", ShapeStr(info->shape),
                                                   " but config.json implies ", ShapeStr(shape)));
  }
  if (info->dtype != DType::kF32 && info->dtype != DType::kF16 && info->dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" has dtype ", DTypeName(info->dtype),
                                                   "; weights must be F32, F16 or BF16"));
  }
  std::vector<char> host(info->bytes);
  FERRY_RETURN_IF_ERROR(ckpt.Read(name, host.data(), host.size()));
  DType dtype = info->dtype;
  if (as_f32 && dtype != DType::kF32) {
    std::vector<char> converted(static_cast<size_t>(info->numel()) * sizeof(float));
    ConvertToF32(dtype, host.data(), reinterpret_cast<float*>(converted.data()), static_cast<size_t>(info->numel()));
    host.swap(converted);
    dtype = DType::kF32;
  }
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend_->Allocate(host.size()));
  FERRY_RETURN_IF_ERROR(backend_->CopyToDevice(buf.data(), host.data(), host.size()));
  weight_bytes_ += host.size();
  TensorView view = MakeView(buf.data(), dtype, shape, backend_->device());
  return Weight{std::move(buf), view};
}

std::string DecoderPrefix(const io::TensorSource& src) {
  if (src.Find("model.decoder.embed_tokens.weight") == nullptr && src.Find("decoder.embed_tokens.weight") != nullptr) {
    return "decoder.";
  }
  return "model.decoder.";
}

struct OptModel::LayerViews {
  TensorView ln1_gamma, ln1_beta, ln2_gamma, ln2_beta;
  TensorView m[6];     // q, k, v, out, fc1, fc2
  TensorView bias[6];  // data == nullptr without biases
};

absl::Status OptModel::LoadGlobals(const io::TensorSource& src, const std::string& prefix) {
  const OptConfig& c = config_;
  const int64_t d = c.hidden_size, w = c.word_embed_proj_dim, v = c.vocab_size;
  auto load = [&](const std::string& name, std::vector<int64_t> shape, bool vec, Weight* out) -> absl::Status {
    FERRY_ASSIGN_OR_RETURN(*out, LoadTensor(src, name, shape, vec));
    return absl::OkStatus();
  };
  FERRY_RETURN_IF_ERROR(load(prefix + "embed_tokens.weight", {v, w}, false, &embed_tokens_));
  FERRY_RETURN_IF_ERROR(load(prefix + "embed_positions.weight", {c.max_positions + OptConfig::kPositionOffset, d}, false,
                             &embed_positions_));
  if (c.final_layer_norm) {
    FERRY_RETURN_IF_ERROR(load(prefix + "final_layer_norm.weight", {d}, true, &final_ln_gamma_));
    FERRY_RETURN_IF_ERROR(load(prefix + "final_layer_norm.bias", {d}, true, &final_ln_beta_));
  }
  if (c.has_projection()) {
    FERRY_RETURN_IF_ERROR(load(prefix + "project_in.weight", {d, w}, false, &project_in_));
    FERRY_RETURN_IF_ERROR(load(prefix + "project_out.weight", {w, d}, false, &project_out_));
  }
  // An explicit lm_head.weight is used when embeddings are not tied.
  if (!c.tie_word_embeddings) {
    if (src.Find("lm_head.weight") == nullptr) {
      return absl::NotFoundError("config.json sets tie_word_embeddings false but the checkpoint lacks \"lm_head.weight\"");
    }
    FERRY_RETURN_IF_ERROR(load("lm_head.weight", {v, w}, false, &lm_head_));
    has_lm_head_ = true;
  }
  return absl::OkStatus();
}

absl::Status OptModel::LoadLayerVectors(const io::TensorSource& src, const std::string& p, OptLayerWeights* L) {
  const int64_t d = config_.hidden_size, f = config_.ffn_dim;
  auto load = [&](const std::string& name, int64_t n, Weight* out) -> absl::Status {
    FERRY_ASSIGN_OR_RETURN(*out, LoadTensor(src, p + name, {n}, true));
    return absl::OkStatus();
  };
  FERRY_RETURN_IF_ERROR(load("self_attn_layer_norm.weight", d, &L->ln1_gamma));
  FERRY_RETURN_IF_ERROR(load("self_attn_layer_norm.bias", d, &L->ln1_beta));
  FERRY_RETURN_IF_ERROR(load("final_layer_norm.weight", d, &L->ln2_gamma));
  FERRY_RETURN_IF_ERROR(load("final_layer_norm.bias", d, &L->ln2_beta));
  if (config_.enable_bias) {
    Weight* biases[6] = {&L->q_bias, &L->k_bias, &L->v_bias, &L->out_bias, &L->fc1_bias, &L->fc2_bias};
    for (int i = 0; i < 6; ++i) FERRY_RETURN_IF_ERROR(load(std::string(kMatrixNames[i]) + ".bias", i == 4 ? f : d, biases[i]));
  }
  return absl::OkStatus();
}

std::vector<int64_t> MatrixShape(const OptConfig& c, int i) {
  const int64_t d = c.hidden_size, f = c.ffn_dim;
  if (i == 4) return {f, d};
  if (i == 5) return {d, f};
  return {d, d};
}

absl::StatusOr<std::unique_ptr<OptModel>> OptModel::Load(const std::string& dir, kernels::Backend* backend) {
  std::unique_ptr<OptModel> m(new OptModel());
  m->backend_ = backend;
  FERRY_ASSIGN_OR_RETURN(m->config_, OptConfig::FromModelDir(dir));
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<io::TensorSource> source, io::OpenTensorSource(dir));
  const std::string prefix = DecoderPrefix(*source);
  FERRY_RETURN_IF_ERROR(m->LoadGlobals(*source, prefix));
  for (int l = 0; l < m->config_.num_layers; ++l) {
    OptLayerWeights L;
    const std::string p = absl::StrCat(prefix, "layers.", l, ".");
    FERRY_RETURN_IF_ERROR(m->LoadLayerVectors(*source, p, &L));
    Weight* mats[6] = {&L.q, &L.k, &L.v, &L.out, &L.fc1, &L.fc2};
    for (int i = 0; i < 6; ++i) {
      FERRY_ASSIGN_OR_RETURN(*mats[i], m->LoadTensor(*source, p + kMatrixNames[i] + ".weight", MatrixShape(m->config_, i), false));
    }
    m->layers_.push_back(std::move(L));
  }
  return m;
}

absl::StatusOr<OptModel::LayerViews> OptModel::Views(int layer) const {
  const OptLayerWeights& L = layers_[layer];
  LayerViews v{L.ln1_gamma.view, L.ln1_beta.view, L.ln2_gamma.view, L.ln2_beta.view, {}, {}};
  const Weight* biases[6] = {&L.q_bias, &L.k_bias, &L.v_bias, &L.out_bias, &L.fc1_bias, &L.fc2_bias};
  for (int i = 0; i < 6; ++i) v.bias[i] = biases[i]->view;
  if (streamer_ == nullptr) {
    const Weight* mats[6] = {&L.q, &L.k, &L.v, &L.out, &L.fc1, &L.fc2};
    for (int i = 0; i < 6; ++i) v.m[i] = mats[i]->view;
    return v;
  }
  FERRY_ASSIGN_OR_RETURN(const char* base, streamer_->Acquire(layer));
  for (int i = 0; i < (sparse_ ? 4 : 6); ++i) {  // sparse: FC1/FC2 come as bundles (GatherBundles)
    const std::vector<int64_t> shape = MatrixShape(config_, i);
    v.m[i] = MakeView(const_cast<char*>(base) + (matrix_offsets_[layer][i] - stream_begin_[layer]), matrix_dtype_, shape,
                      backend_->device());
  }
  return v;
}

absl::Status OptModel::ReleaseLayer(int layer) const {
  if (streamer_ == nullptr) return absl::OkStatus();
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Fence> fence, backend_->RecordFence());
  return streamer_->Release(layer, std::move(fence));
}

uint64_t OptModel::ForwardWorkspaceBytes(const OptConfig& c, int64_t n, int64_t r, int64_t micro) {
  if (micro <= 0 || micro > n) micro = n;
  // ids and the residual stream h [n, d]; per micro-batch a, q, k, v, att [., d], ffn [., f], the
  // embedding projection and the CUDA GEMM input scratch (16-bit, [., max(d, f)]); the head's rows,
  // projection and logits; the CUDA backend's GEMM split scratch, launch plans and sampling scratch;
  // allocator slack.
  return static_cast<uint64_t>(n) * (16 + 4 * c.hidden_size) +
         static_cast<uint64_t>(micro) * (5 * 4 * c.hidden_size + 4 * c.ffn_dim + 4 * c.word_embed_proj_dim +
                                         2 * std::max(c.ffn_dim, c.hidden_size)) +
         static_cast<uint64_t>(r) * 4 * (c.hidden_size + c.word_embed_proj_dim + c.vocab_size) +
         // the CUDA GEMMs of <= 128 rows split their input (hi + lo, 16-bit) and write 2 rows each
         static_cast<uint64_t>(std::min<int64_t>(std::max(micro, r), 128)) *
             (4 * std::max({c.hidden_size, c.ffn_dim, c.word_embed_proj_dim}) + 8 * std::max(c.ffn_dim, c.vocab_size)) +
         // the CUDA attention launch plans
         static_cast<uint64_t>(n) * 4 * 12 +
         // sampling on the GPU: sorted logits, ids in and out, cumulative sums (F64), the sort's temporaries
         static_cast<uint64_t>(r) * c.vocab_size * 32 + (2 << 20);
}

uint64_t OptModel::KvCacheBytes(const OptConfig& c, int64_t rows, int64_t max_len, DType kv_dtype) {
  return 2ull * c.num_layers * static_cast<uint64_t>(rows) * static_cast<uint64_t>(max_len) * c.hidden_size * DTypeSize(kv_dtype);
}

absl::Status OptModel::Forward(const ForwardBatch& batch, offload::AttentionCache& cache, std::vector<float>* logits) const {
  const OptConfig& c = config_;
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  const int64_t r = static_cast<int64_t>(batch.logit_rows.size());
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
  FERRY_RETURN_IF_ERROR(cache.Check(batch.seq_ids, batch.positions));
  for (int32_t row : batch.logit_rows) {
    if (row < 0 || row >= n) return absl::InvalidArgumentError("Forward: logit row out of range");
  }
  kernels::Backend& b = *backend_;
  const int64_t d = c.hidden_size, w = c.word_embed_proj_dim;

  // Inputs to the device.
  FERRY_ASSIGN_OR_RETURN(Weight tokens, Alloc(DType::kI32, {n}));
  FERRY_ASSIGN_OR_RETURN(Weight seq_ids, Alloc(DType::kI32, {n}));
  FERRY_ASSIGN_OR_RETURN(Weight positions, Alloc(DType::kI32, {n}));
  FERRY_ASSIGN_OR_RETURN(Weight rows, Alloc(DType::kI32, {std::max<int64_t>(r, 1)}));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(tokens.buffer.data(), batch.tokens.data(), n * 4));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(seq_ids.buffer.data(), batch.seq_ids.data(), n * 4));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(positions.buffer.data(), batch.positions.data(), n * 4));
  if (r > 0) FERRY_RETURN_IF_ERROR(b.CopyToDevice(rows.buffer.data(), batch.logit_rows.data(), r * 4));

  // Micro-batches (FlexGen's GPU batches): each layer's weights are acquired once and run over
  // every micro-batch in turn, so the temporaries only hold one micro-batch.
  std::vector<int64_t> ends;
  for (int32_t e : batch.micro_batch_ends) ends.push_back(e);
  if (ends.empty() || ends.back() != n) ends.push_back(n);
  int64_t micro = 0;
  for (size_t m = 0; m < ends.size(); ++m) {
    const int64_t begin = m == 0 ? 0 : ends[m - 1];
    if (ends[m] <= begin || ends[m] > n) return absl::InvalidArgumentError("Forward: micro-batch ends must increase up to n");
    if (ends[m] < n && batch.seq_ids[ends[m] - 1] == batch.seq_ids[ends[m]]) {
      return absl::InvalidArgumentError("Forward: a micro-batch boundary splits a sequence");
    }
    micro = std::max(micro, ends[m] - begin);
  }
  FERRY_ASSIGN_OR_RETURN(Weight h, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(Weight a, Alloc(DType::kF32, {micro, d}));
  FERRY_ASSIGN_OR_RETURN(Weight q, Alloc(DType::kF32, {micro, d}));
  FERRY_ASSIGN_OR_RETURN(Weight k, Alloc(DType::kF32, {micro, d}));
  FERRY_ASSIGN_OR_RETURN(Weight v, Alloc(DType::kF32, {micro, d}));
  FERRY_ASSIGN_OR_RETURN(Weight att, Alloc(DType::kF32, {micro, d}));
  Weight ffn;  // sparse: BundledFfn keeps its activations in its own scratch of at most this size
  if (!sparse_) {
    FERRY_ASSIGN_OR_RETURN(ffn, Alloc(DType::kF32, {micro, c.ffn_dim}));
  }
  Weight e, tap_in;
  const bool tap = batch.ffn_hook != nullptr || (sparse_ && batch.ffn_select != nullptr);
  if (tap) {
    FERRY_ASSIGN_OR_RETURN(tap_in, Alloc(DType::kF32, {micro, d}));
  }
  if (c.has_projection()) {
    FERRY_ASSIGN_OR_RETURN(e, Alloc(DType::kF32, {micro, w}));
  }
  std::vector<std::vector<int32_t>> host_seq(ends.size()), host_pos(ends.size());
  for (size_t m = 0; m < ends.size(); ++m) {
    const int64_t begin = m == 0 ? 0 : ends[m - 1];
    host_seq[m].assign(batch.seq_ids.begin() + begin, batch.seq_ids.begin() + ends[m]);
    host_pos[m].assign(batch.positions.begin() + begin, batch.positions.begin() + ends[m]);
  }

  // Embeddings.
  for (size_t m = 0; m < ends.size(); ++m) {
    const int64_t begin = m == 0 ? 0 : ends[m - 1], len = ends[m] - begin;
    const TensorView hm = h.view.Rows(begin, ends[m]), am = a.view.Rows(0, len);
    if (c.has_projection()) {
      const TensorView em = e.view.Rows(0, len);
      FERRY_RETURN_IF_ERROR(b.GatherRows({embed_tokens_.view, tokens.view.Rows(begin, ends[m]), 0, em}));
      FERRY_RETURN_IF_ERROR(b.Linear({em, project_in_.view, TensorView{}, hm, false}));
    } else {
      FERRY_RETURN_IF_ERROR(b.GatherRows({embed_tokens_.view, tokens.view.Rows(begin, ends[m]), 0, hm}));
    }
    FERRY_RETURN_IF_ERROR(
        b.GatherRows({embed_positions_.view, positions.view.Rows(begin, ends[m]), OptConfig::kPositionOffset, am}));
    FERRY_RETURN_IF_ERROR(b.Add(hm, am, hm));
  }

  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim()));
  for (int l = 0; l < c.num_layers; ++l) {
    FERRY_ASSIGN_OR_RETURN(const LayerViews L, Views(l));
    for (size_t m = 0; m < ends.size(); ++m) {
      const int64_t begin = m == 0 ? 0 : ends[m - 1], len = ends[m] - begin;
      const TensorView hm = h.view.Rows(begin, ends[m]);
      const TensorView am = a.view.Rows(0, len), qm = q.view.Rows(0, len), km = k.view.Rows(0, len),
                       vm = v.view.Rows(0, len), attm = att.view.Rows(0, len);
      const TensorView ffnm = sparse_ ? TensorView{} : ffn.view.Rows(0, len);
      // Attention block.
      const TensorView* attn_in = &hm;
      if (c.layer_norm_before) {
        FERRY_RETURN_IF_ERROR(b.LayerNorm({hm, L.ln1_gamma, L.ln1_beta, am, 1e-5f}));
        attn_in = &am;
      }
      if (tap) {
        FERRY_RETURN_IF_ERROR(b.CopyTensor(*attn_in, tap_in.view.Rows(0, len)));
      }
      FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, L.m[0], L.bias[0], qm, false}));
      FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, L.m[1], L.bias[1], km, false}));
      FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, L.m[2], L.bias[2], vm, false}));
      FERRY_RETURN_IF_ERROR(cache.Attend(b, {l, qm, km, vm, seq_ids.view.Rows(begin, ends[m]),
                                             positions.view.Rows(begin, ends[m]), &host_seq[m], &host_pos[m], attm,
                                             c.num_heads, scale}));
      FERRY_RETURN_IF_ERROR(b.Linear({attm, L.m[3], L.bias[3], qm, false}));
      // The residual add fused with the LayerNorm after it: the FFN's input LN (pre-LN), or the
      // attention block's output LN (post-LN, in place).
      const TensorView* ffn_in = &hm;
      if (c.layer_norm_before) {
        FERRY_RETURN_IF_ERROR(b.AddLayerNorm({hm, qm, L.ln2_gamma, L.ln2_beta, am, 1e-5f}));
        ffn_in = &am;
      } else {
        FERRY_RETURN_IF_ERROR(b.AddLayerNorm({hm, qm, L.ln1_gamma, L.ln1_beta, hm, 1e-5f}));
      }
      if (sparse_) {
        // Deja Vu: only the chosen neurons' bundles cross the link and are computed.
        std::vector<int32_t> chosen;
        if (batch.ffn_select != nullptr) {
          FERRY_ASSIGN_OR_RETURN(chosen, (*batch.ffn_select)(l, tap_in.view.Rows(0, len)));
        } else {
          chosen.resize(static_cast<size_t>(c.ffn_dim));
          for (int32_t j = 0; j < c.ffn_dim; ++j) chosen[j] = j;
        }
        FERRY_ASSIGN_OR_RETURN(const TensorView bundles, GatherBundles(l, chosen));
        FERRY_RETURN_IF_ERROR(b.BundledFfn({*ffn_in, bundles, L.bias[5], qm}));
      } else {
        FERRY_RETURN_IF_ERROR(b.Linear({*ffn_in, L.m[4], L.bias[4], ffnm, true}));
        if (batch.ffn_hook != nullptr) {
          FERRY_RETURN_IF_ERROR(b.Synchronize());
          FERRY_RETURN_IF_ERROR((*batch.ffn_hook)(l, tap_in.view.Rows(0, len), ffnm));
        }
        FERRY_RETURN_IF_ERROR(b.Linear({ffnm, L.m[5], L.bias[5], qm, false}));
      }
      if (c.layer_norm_before) {
        FERRY_RETURN_IF_ERROR(b.Add(hm, qm, hm));  // the next LayerNorm is the next layer's
      } else {
        FERRY_RETURN_IF_ERROR(b.AddLayerNorm({hm, qm, L.ln2_gamma, L.ln2_beta, hm, 1e-5f}));
      }
    }
    FERRY_RETURN_IF_ERROR(ReleaseLayer(l));
  }
  if (batch.argmax_ids != nullptr) {
    batch.argmax_ids->clear();
    logits->clear();
  } else {
    logits->assign(static_cast<size_t>(r) * c.vocab_size, 0.0f);
  }
  if (r == 0) return b.Synchronize();

  // Head over the requested rows only.
  FERRY_ASSIGN_OR_RETURN(Weight sel, Alloc(DType::kF32, {r, d}));
  FERRY_RETURN_IF_ERROR(b.GatherRows({h.view, rows.view, 0, sel.view}));
  if (c.final_layer_norm) {
    FERRY_RETURN_IF_ERROR(b.LayerNorm({sel.view, final_ln_gamma_.view, final_ln_beta_.view, sel.view, 1e-5f}));
  }
  TensorView head_in = sel.view;
  Weight projected;
  if (c.has_projection()) {
    FERRY_ASSIGN_OR_RETURN(projected, Alloc(DType::kF32, {r, w}));
    FERRY_RETURN_IF_ERROR(b.Linear({sel.view, project_out_.view, TensorView{}, projected.view, false}));
    head_in = projected.view;
  }
  FERRY_ASSIGN_OR_RETURN(Weight out, Alloc(DType::kF32, {r, c.vocab_size}));
  const TensorView& head = has_lm_head_ ? lm_head_.view : embed_tokens_.view;
  FERRY_RETURN_IF_ERROR(b.Linear({head_in, head, TensorView{}, out.view, false}));
  if (batch.argmax_ids != nullptr) {
    if (batch.banned_token >= 0 && batch.banned_token < c.vocab_size) {
      const float banned = -INFINITY;
      for (int32_t row : batch.banned_rows) {
        if (row < 0 || row >= r) return absl::InvalidArgumentError("Forward: banned row out of range");
        float* at = out.view.as<float>() + static_cast<int64_t>(row) * c.vocab_size + batch.banned_token;
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
  FERRY_RETURN_IF_ERROR(b.CopyToHost(logits->data(), out.buffer.data(), logits->size() * sizeof(float)));
  return b.Synchronize();
}

}  // namespace ferry::engine
