#include "engine/opt_model.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::engine {
namespace {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

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

}  // namespace

absl::StatusOr<KvCache> KvCache::Create(kernels::Backend& backend, const OptConfig& config, int rows, int max_len) {
  if (rows <= 0 || max_len <= 0) return absl::InvalidArgumentError("KV cache needs at least one row and one slot");
  KvCache cache;
  cache.rows_ = rows;
  cache.max_len_ = max_len;
  const std::vector<int64_t> shape = {rows, max_len, config.hidden_size};
  const size_t bytes = static_cast<size_t>(rows) * max_len * config.hidden_size * sizeof(float);
  for (int l = 0; l < config.num_layers; ++l) {
    for (auto* list : {&cache.k_, &cache.v_}) {
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend.Allocate(bytes));
      TensorView view = MakeView(buf.data(), DType::kF32, shape, backend.device());
      list->push_back(Weight{std::move(buf), view});
    }
  }
  return cache;
}

absl::StatusOr<Weight> OptModel::Alloc(DType dtype, std::initializer_list<int64_t> shape) const {
  const std::vector<int64_t> dims(shape);
  size_t bytes = DTypeSize(dtype);
  for (int64_t d : dims) bytes *= static_cast<size_t>(d);
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend_->Allocate(bytes));
  TensorView view = MakeView(buf.data(), dtype, dims, backend_->device());
  return Weight{std::move(buf), view};
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

absl::StatusOr<std::unique_ptr<OptModel>> OptModel::Load(const std::string& dir, kernels::Backend* backend) {
  std::unique_ptr<OptModel> m(new OptModel());
  m->backend_ = backend;
  FERRY_ASSIGN_OR_RETURN(m->config_, OptConfig::FromModelDir(dir));
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<io::TensorSource> source, io::OpenTensorSource(dir));
  const io::TensorSource& ckpt = *source;
  const OptConfig& c = m->config_;
  std::string prefix = "model.decoder.";
  if (ckpt.Find(prefix + "embed_tokens.weight") == nullptr && ckpt.Find("decoder.embed_tokens.weight") != nullptr) {
    prefix = "decoder.";
  }
  const int64_t d = c.hidden_size, f = c.ffn_dim, w = c.word_embed_proj_dim, v = c.vocab_size;
  auto load = [&](const std::string& name, std::vector<int64_t> shape, bool vec, Weight* out) -> absl::Status {
    FERRY_ASSIGN_OR_RETURN(*out, m->LoadTensor(ckpt, name, shape, vec));
    return absl::OkStatus();
  };
  FERRY_RETURN_IF_ERROR(load(prefix + "embed_tokens.weight", {v, w}, false, &m->embed_tokens_));
  FERRY_RETURN_IF_ERROR(load(prefix + "embed_positions.weight", {c.max_positions + OptConfig::kPositionOffset, d},
                             false, &m->embed_positions_));
  if (c.final_layer_norm) {
    FERRY_RETURN_IF_ERROR(load(prefix + "final_layer_norm.weight", {d}, true, &m->final_ln_gamma_));
    FERRY_RETURN_IF_ERROR(load(prefix + "final_layer_norm.bias", {d}, true, &m->final_ln_beta_));
  }
  if (c.has_projection()) {
    FERRY_RETURN_IF_ERROR(load(prefix + "project_in.weight", {d, w}, false, &m->project_in_));
    FERRY_RETURN_IF_ERROR(load(prefix + "project_out.weight", {w, d}, false, &m->project_out_));
  }
  // An explicit lm_head.weight is used when the checkpoint has one and embeddings are not tied.
  if (!c.tie_word_embeddings) {
    if (ckpt.Find("lm_head.weight") == nullptr) {
      return absl::NotFoundError("config.json sets tie_word_embeddings false but the checkpoint lacks \"lm_head.weight\"");
    }
    FERRY_RETURN_IF_ERROR(load("lm_head.weight", {v, w}, false, &m->lm_head_));
    m->has_lm_head_ = true;
  }
  for (int l = 0; l < c.num_layers; ++l) {
    OptLayerWeights L;
    const std::string p = absl::StrCat(prefix, "layers.", l, ".");
    FERRY_RETURN_IF_ERROR(load(p + "self_attn_layer_norm.weight", {d}, true, &L.ln1_gamma));
    FERRY_RETURN_IF_ERROR(load(p + "self_attn_layer_norm.bias", {d}, true, &L.ln1_beta));
    FERRY_RETURN_IF_ERROR(load(p + "final_layer_norm.weight", {d}, true, &L.ln2_gamma));
    FERRY_RETURN_IF_ERROR(load(p + "final_layer_norm.bias", {d}, true, &L.ln2_beta));
    const std::pair<const char*, std::pair<Weight*, Weight*>> attn[] = {
        {"self_attn.q_proj", {&L.q, &L.q_bias}},
        {"self_attn.k_proj", {&L.k, &L.k_bias}},
        {"self_attn.v_proj", {&L.v, &L.v_bias}},
        {"self_attn.out_proj", {&L.out, &L.out_bias}}};
    for (const auto& [name, ws] : attn) {
      FERRY_RETURN_IF_ERROR(load(p + name + ".weight", {d, d}, false, ws.first));
      if (c.enable_bias) FERRY_RETURN_IF_ERROR(load(p + name + ".bias", {d}, true, ws.second));
    }
    FERRY_RETURN_IF_ERROR(load(p + "fc1.weight", {f, d}, false, &L.fc1));
    FERRY_RETURN_IF_ERROR(load(p + "fc2.weight", {d, f}, false, &L.fc2));
    if (c.enable_bias) {
      FERRY_RETURN_IF_ERROR(load(p + "fc1.bias", {f}, true, &L.fc1_bias));
      FERRY_RETURN_IF_ERROR(load(p + "fc2.bias", {d}, true, &L.fc2_bias));
    }
    m->layers_.push_back(std::move(L));
  }
  return m;
}

absl::Status OptModel::Forward(const ForwardBatch& batch, KvCache& cache, std::vector<float>* logits) const {
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

  FERRY_ASSIGN_OR_RETURN(Weight h, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(Weight a, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(Weight q, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(Weight k, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(Weight v, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(Weight att, Alloc(DType::kF32, {n, d}));
  FERRY_ASSIGN_OR_RETURN(Weight ffn, Alloc(DType::kF32, {n, c.ffn_dim}));

  // Embeddings.
  if (c.has_projection()) {
    FERRY_ASSIGN_OR_RETURN(Weight e, Alloc(DType::kF32, {n, w}));
    FERRY_RETURN_IF_ERROR(b.GatherRows({embed_tokens_.view, tokens.view, 0, e.view}));
    FERRY_RETURN_IF_ERROR(b.Linear({e.view, project_in_.view, TensorView{}, h.view, false}));
  } else {
    FERRY_RETURN_IF_ERROR(b.GatherRows({embed_tokens_.view, tokens.view, 0, h.view}));
  }
  FERRY_RETURN_IF_ERROR(b.GatherRows({embed_positions_.view, positions.view, OptConfig::kPositionOffset, a.view}));
  FERRY_RETURN_IF_ERROR(b.Add(h.view, a.view, h.view));

  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim()));
  for (int l = 0; l < c.num_layers; ++l) {
    const OptLayerWeights& L = layers_[l];
    // Attention block.
    const TensorView* attn_in = &h.view;
    if (c.layer_norm_before) {
      FERRY_RETURN_IF_ERROR(b.LayerNorm({h.view, L.ln1_gamma.view, L.ln1_beta.view, a.view, 1e-5f}));
      attn_in = &a.view;
    }
    FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, L.q.view, L.q_bias.view, q.view, false}));
    FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, L.k.view, L.k_bias.view, k.view, false}));
    FERRY_RETURN_IF_ERROR(b.Linear({*attn_in, L.v.view, L.v_bias.view, v.view, false}));
    FERRY_RETURN_IF_ERROR(b.KvWrite({k.view, v.view, cache.k(l), cache.v(l), seq_ids.view, positions.view}));
    FERRY_RETURN_IF_ERROR(b.Attention({q.view, cache.k(l), cache.v(l), seq_ids.view, positions.view, att.view,
                                       c.num_heads, scale}));
    FERRY_RETURN_IF_ERROR(b.Linear({att.view, L.out.view, L.out_bias.view, q.view, false}));
    FERRY_RETURN_IF_ERROR(b.Add(h.view, q.view, h.view));
    if (!c.layer_norm_before) {
      FERRY_RETURN_IF_ERROR(b.LayerNorm({h.view, L.ln1_gamma.view, L.ln1_beta.view, h.view, 1e-5f}));
    }
    // FFN block.
    const TensorView* ffn_in = &h.view;
    if (c.layer_norm_before) {
      FERRY_RETURN_IF_ERROR(b.LayerNorm({h.view, L.ln2_gamma.view, L.ln2_beta.view, a.view, 1e-5f}));
      ffn_in = &a.view;
    }
    FERRY_RETURN_IF_ERROR(b.Linear({*ffn_in, L.fc1.view, L.fc1_bias.view, ffn.view, true}));
    FERRY_RETURN_IF_ERROR(b.Linear({ffn.view, L.fc2.view, L.fc2_bias.view, q.view, false}));
    FERRY_RETURN_IF_ERROR(b.Add(h.view, q.view, h.view));
    if (!c.layer_norm_before) {
      FERRY_RETURN_IF_ERROR(b.LayerNorm({h.view, L.ln2_gamma.view, L.ln2_beta.view, h.view, 1e-5f}));
    }
  }
  logits->assign(static_cast<size_t>(r) * c.vocab_size, 0.0f);
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
  FERRY_RETURN_IF_ERROR(b.CopyToHost(logits->data(), out.buffer.data(), logits->size() * sizeof(float)));
  return b.Synchronize();
}

}  // namespace ferry::engine
