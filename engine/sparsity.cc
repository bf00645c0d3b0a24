#include "engine/sparsity.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/file.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "io/safetensors.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using nlohmann::json;

std::string LayerFile(const std::string& dir, int l, const char* kind) { return absl::StrCat(dir, "/layer-", l, ".", kind); }

absl::Status WriteAppend(std::ofstream& out, const void* data, size_t n, const std::string& path) {
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  if (!out) return absl::DataLossError(absl::StrCat("error writing ", path));
  return absl::OkStatus();
}

struct Meta {
  int64_t tokens = 0;
  int d = 0, ffn = 0, layers = 0, window = 0;
  std::vector<double> active;
};

absl::StatusOr<Meta> ReadMeta(const std::string& dir) {
  FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/meta.json"));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError(absl::StrCat(dir, "/meta.json is not JSON"));
  Meta m;
  try {
    m.tokens = j.at("tokens").get<int64_t>();
    m.d = j.at("hidden").get<int>();
    m.ffn = j.at("ffn").get<int>();
    m.layers = j.at("layers").get<int>();
    m.window = j.at("window").get<int>();
    m.active = j.at("active_fraction").get<std::vector<double>>();
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(dir, "/meta.json: ", e.what()));
  }
  return m;
}

// One layer's collected data in memory.
struct LayerData {
  std::vector<float> x;       // [tokens, d]
  std::vector<uint8_t> bits;  // [tokens, row_bytes]
  int64_t row_bytes = 0;
  bool Active(int64_t t, int j) const { return (bits[t * row_bytes + j / 8] >> (j % 8)) & 1; }
};

absl::StatusOr<LayerData> ReadLayer(const std::string& dir, const Meta& m, int l) {
  LayerData L;
  L.row_bytes = (m.ffn + 7) / 8;
  FERRY_ASSIGN_OR_RETURN(std::string in, ReadFileToString(LayerFile(dir, l, "inputs")));
  FERRY_ASSIGN_OR_RETURN(std::string lb, ReadFileToString(LayerFile(dir, l, "labels")));
  if (in.size() != static_cast<size_t>(m.tokens) * m.d * 2 || lb.size() != static_cast<size_t>(m.tokens * L.row_bytes)) {
    return absl::DataLossError(absl::StrCat(dir, ": layer ", l, " files do not match meta.json"));
  }
  L.x.resize(static_cast<size_t>(m.tokens) * m.d);
  ConvertToF32(DType::kF16, in.data(), L.x.data(), L.x.size());
  L.bits.assign(lb.begin(), lb.end());
  return L;
}

// Held-out recall at k: hits among each token's top-k scores over its true positives.
double RecallAtK(const std::vector<float>& scores, const LayerData& L, int64_t t0, int64_t t1, int ffn, int k) {
  int64_t hits = 0, positives = 0;
  std::vector<int> idx(ffn);
  for (int64_t t = t0; t < t1; ++t) {
    const float* z = scores.data() + (t - t0) * ffn;
    std::iota(idx.begin(), idx.end(), 0);
    std::nth_element(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) { return z[a] > z[b]; });
    for (int j = 0; j < ffn; ++j) positives += L.Active(t, j);
    for (int i = 0; i < k; ++i) hits += L.Active(t, idx[i]);
  }
  return positives > 0 ? static_cast<double>(hits) / positives : 1.0;
}


// The floats of `v` on the host: its own memory, or (device memory) a copy in `buf` read through
// `backend`.
absl::StatusOr<float*> HostFloats(kernels::Backend* backend, const TensorView& v, std::vector<float>& buf) {
  if (v.device == Device::kCpu) return v.as<float>();
  if (backend == nullptr) return absl::InvalidArgumentError("sparsity: device views need the backend");
  buf.resize(static_cast<size_t>(v.numel()));
  FERRY_RETURN_IF_ERROR(backend->CopyToHost(buf.data(), v.data, v.bytes()));
  return buf.data();
}

}  // namespace

namespace {

// Deja Vu's predictors learn which ReLU outputs are positive; a SwiGLU FFN has none.
absl::Status RequireRelu(const ModelConfig& c) {
  if (c.ffn == FfnKind::kRelu) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("Deja Vu sparsity needs a ReLU FFN; this ", c.model_type,
                                                 " model has a SwiGLU FFN (activation sparsity for SwiGLU models is not supported yet)"));
}

}  // namespace

absl::Status CollectActivations(Model& model, const std::vector<int>& ids, const std::string& out_dir,
                                const CollectOptions& o) {
  const ModelConfig& c = model.config();
  FERRY_RETURN_IF_ERROR(RequireRelu(c));
  if (o.window < 2 || o.window > c.max_positions) return absl::InvalidArgumentError("bad window");
  const int64_t total = o.tokens > 0 ? std::min<int64_t>(o.tokens, ids.size()) : static_cast<int64_t>(ids.size());
  if (total < 1) return absl::InvalidArgumentError("no tokens to collect");
  FERRY_RETURN_IF_ERROR(MakeDirs(out_dir));
  const int64_t row_bytes = (c.ffn_dim + 7) / 8;
  std::vector<std::ofstream> inputs(c.num_layers), labels(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    inputs[l].open(LayerFile(out_dir, l, "inputs"), std::ios::binary | std::ios::trunc);
    labels[l].open(LayerFile(out_dir, l, "labels"), std::ios::binary | std::ios::trunc);
    if (!inputs[l] || !labels[l]) return absl::PermissionDeniedError(absl::StrCat("cannot write into ", out_dir));
  }
  std::vector<int64_t> active(c.num_layers, 0);
  std::vector<uint16_t> half;
  std::vector<uint8_t> bits;
  std::vector<float> x_host, act_host;
  const std::function<absl::Status(int, const TensorView&, const TensorView&)> hook =
      [&](int l, const TensorView& x, const TensorView& act) -> absl::Status {
    const int64_t n = x.shape[0];
    FERRY_ASSIGN_OR_RETURN(const float* xs, HostFloats(&model.backend(), x, x_host));
    FERRY_ASSIGN_OR_RETURN(const float* a, HostFloats(&model.backend(), act, act_host));
    half.resize(static_cast<size_t>(n) * c.hidden_size);
    ConvertFromF32(DType::kF16, xs, half.data(), half.size());
    FERRY_RETURN_IF_ERROR(WriteAppend(inputs[l], half.data(), half.size() * 2, LayerFile(out_dir, l, "inputs")));
    bits.assign(static_cast<size_t>(n * row_bytes), 0);
    for (int64_t t = 0; t < n; ++t) {
      for (int j = 0; j < c.ffn_dim; ++j) {
        if (a[t * c.ffn_dim + j] > 0.0f) {
          bits[t * row_bytes + j / 8] |= static_cast<uint8_t>(1u << (j % 8));
          ++active[l];
        }
      }
    }
    return WriteAppend(labels[l], bits.data(), bits.size(), LayerFile(out_dir, l, "labels"));
  };
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<offload::AttentionCache> cache, offload::CreateKvCache(model.backend(), KvSpec(c, 1, o.window)));
  std::vector<float> logits;
  for (int64_t begin = 0; begin < total; begin += o.window) {
    const int64_t end = std::min(total, begin + o.window);
    ForwardBatch b;
    for (int64_t i = begin; i < end; ++i) {
      b.tokens.push_back(ids[i]);
      b.seq_ids.push_back(0);
      b.positions.push_back(static_cast<int32_t>(i - begin));
    }
    b.ffn_hook = &hook;
    FERRY_RETURN_IF_ERROR(model.Forward(b, *cache, &logits));
    if (o.progress) o.progress(end, total);
  }
  json meta = {{"tokens", total}, {"hidden", c.hidden_size}, {"ffn", c.ffn_dim}, {"layers", c.num_layers},
               {"window", o.window}, {"active_fraction", json::array()}};
  for (int l = 0; l < c.num_layers; ++l) {
    meta["active_fraction"].push_back(static_cast<double>(active[l]) / (static_cast<double>(total) * c.ffn_dim));
    inputs[l].close();
    labels[l].close();
    if (!inputs[l] || !labels[l]) return absl::DataLossError(absl::StrCat("error closing the files of layer ", l));
  }
  std::ofstream m(out_dir + "/meta.json");
  m << meta.dump(1) << "\n";
  if (!m) return absl::DataLossError(absl::StrCat("cannot write ", out_dir, "/meta.json"));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerSparsity>> TrainPredictors(const std::string& data_dir, const std::string& out_dir,
                                                           const TrainOptions& o) {
  FERRY_ASSIGN_OR_RETURN(Meta meta, ReadMeta(data_dir));
  if (o.rank < 1 || o.epochs < 1 || o.batch < 1 || !(o.holdout > 0 && o.holdout < 1) || !(o.k_fraction > 0 && o.k_fraction <= 1)) {
    return absl::InvalidArgumentError("bad training options (rank, epochs, batch >= 1; holdout and k in (0, 1))");
  }
  FERRY_RETURN_IF_ERROR(MakeDirs(out_dir));
  const int d = meta.d, F = meta.ffn, r = o.rank;
  const int k = std::max(1, static_cast<int>(std::lround(o.k_fraction * F)));
  const int64_t n_train = static_cast<int64_t>(meta.tokens * (1.0 - o.holdout));
  if (n_train < o.batch || meta.tokens - n_train < 1) return absl::InvalidArgumentError("too few tokens to train and hold out");
  std::vector<LayerSparsity> result;
  std::vector<std::vector<float>> keep_down(meta.layers), keep_up(meta.layers), keep_bias(meta.layers);
  std::mt19937 rng(static_cast<uint32_t>(o.seed));
  kernels::CpuBackend default_cpu;  // where no backend is given
  kernels::Backend& be = o.backend != nullptr ? *o.backend : default_cpu;
  for (int l = 0; l < meta.layers; ++l) {
    LayerSparsity ls;
    ls.layer = l;
    ls.active_fraction = meta.active[l];
    ls.dense = meta.active[l] > o.dense_above;
    if (ls.dense) {
      result.push_back(ls);
      if (o.progress) o.progress(absl::StrFormat("layer %d: %.1f%% active, stays dense", l, 100 * meta.active[l]));
      continue;
    }
    FERRY_ASSIGN_OR_RETURN(LayerData L, ReadLayer(data_dir, meta, l));
    const double p = std::clamp(meta.active[l], 1e-4, 1 - 1e-4);
    const float w1 = static_cast<float>(0.5 / p), w0 = static_cast<float>(0.5 / (1 - p));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> down(static_cast<size_t>(r) * d), up(static_cast<size_t>(F) * r), bias(F, std::log(p / (1 - p)));
    for (auto& x : down) x = nd(rng) / std::sqrt(static_cast<float>(d));
    for (auto& x : up) x = nd(rng) / std::sqrt(static_cast<float>(r));
    // Weights, Adam's moments and the step's temporaries live in backend memory; the host gathers
    // each batch's rows and labels and copies them over.
    const int B = o.batch;
    const int64_t held = meta.tokens - n_train, chunk = std::min<int64_t>(held, 16384);
    FERRY_ASSIGN_OR_RETURN(Weight dw, AllocWeight(be, DType::kF32, {r, d}));
    FERRY_ASSIGN_OR_RETURN(Weight uw, AllocWeight(be, DType::kF32, {F, r}));
    FERRY_ASSIGN_OR_RETURN(Weight bw, AllocWeight(be, DType::kF32, {F}));
    FERRY_RETURN_IF_ERROR(be.CopyToDevice(dw.view.data, down.data(), dw.view.bytes()));
    FERRY_RETURN_IF_ERROR(be.CopyToDevice(uw.view.data, up.data(), uw.view.bytes()));
    FERRY_RETURN_IF_ERROR(be.CopyToDevice(bw.view.data, bias.data(), bw.view.bytes()));
    std::vector<Weight> moments;  // m and v of down, up, bias, zeroed
    for (const Weight* w : {&dw, &uw, &bw}) {
      for (int i = 0; i < 2; ++i) {
        FERRY_ASSIGN_OR_RETURN(Weight mv, AllocWeight(be, DType::kF32, {w->view.numel()}));
        const std::vector<float> zeros(mv.view.numel(), 0.0f);
        FERRY_RETURN_IF_ERROR(be.CopyToDevice(mv.view.data, zeros.data(), mv.view.bytes()));
        moments.push_back(std::move(mv));
      }
    }
    FERRY_ASSIGN_OR_RETURN(Weight gdown, AllocWeight(be, DType::kF32, {r, d}));
    FERRY_ASSIGN_OR_RETURN(Weight gup, AllocWeight(be, DType::kF32, {F, r}));
    FERRY_ASSIGN_OR_RETURN(Weight gbias, AllocWeight(be, DType::kF32, {F}));
    FERRY_ASSIGN_OR_RETURN(Weight xb, AllocWeight(be, DType::kF32, {B, d}));
    FERRY_ASSIGN_OR_RETURN(Weight lb, AllocWeight(be, DType::kU8, {B, L.row_bytes}));
    FERRY_ASSIGN_OR_RETURN(Weight h, AllocWeight(be, DType::kF32, {B, r}));
    FERRY_ASSIGN_OR_RETURN(Weight z, AllocWeight(be, DType::kF32, {B, F}));
    FERRY_ASSIGN_OR_RETURN(Weight g, AllocWeight(be, DType::kF32, {B, F}));
    FERRY_ASSIGN_OR_RETURN(Weight gh, AllocWeight(be, DType::kF32, {B, r}));
    FERRY_ASSIGN_OR_RETURN(Weight hx, AllocWeight(be, DType::kF32, {chunk, d}));
    FERRY_ASSIGN_OR_RETURN(Weight hh, AllocWeight(be, DType::kF32, {chunk, r}));
    FERRY_ASSIGN_OR_RETURN(Weight hz, AllocWeight(be, DType::kF32, {chunk, F}));
    int adam_step = 0;
    const float b1 = 0.9f, b2 = 0.999f;
    std::vector<int64_t> order(n_train);
    std::iota(order.begin(), order.end(), 0);
    std::vector<float> xb_host(static_cast<size_t>(B) * d);
    std::vector<uint8_t> lb_host(static_cast<size_t>(B) * L.row_bytes);
    std::vector<float> z_held(static_cast<size_t>(held) * F);
    double best = -1;
    std::vector<float> best_down, best_up, best_bias;
    int since_best = 0;
    for (int epoch = 0; epoch < o.epochs && since_best < 2; ++epoch) {
      std::shuffle(order.begin(), order.end(), rng);
      for (int64_t b0 = 0; b0 + B <= n_train; b0 += B) {
        for (int i = 0; i < B; ++i) {
          std::copy_n(L.x.data() + order[b0 + i] * d, d, xb_host.data() + static_cast<size_t>(i) * d);
          std::copy_n(L.bits.data() + order[b0 + i] * L.row_bytes, L.row_bytes, lb_host.data() + static_cast<size_t>(i) * L.row_bytes);
        }
        FERRY_RETURN_IF_ERROR(be.CopyToDevice(xb.view.data, xb_host.data(), xb.view.bytes()));
        FERRY_RETURN_IF_ERROR(be.CopyToDevice(lb.view.data, lb_host.data(), lb.view.bytes()));
        // z = up (down x) + bias; dLoss/dz of the class-balanced BCE averaged over the batch; back
        // through both factors; Adam.
        FERRY_RETURN_IF_ERROR(be.MatMul({xb.view, dw.view, h.view, false, true, TensorView{}}));
        FERRY_RETURN_IF_ERROR(be.MatMul({h.view, uw.view, z.view, false, true, bw.view}));
        FERRY_RETURN_IF_ERROR(be.BceGrad({z.view, lb.view, g.view, gbias.view, w1, w0}));
        FERRY_RETURN_IF_ERROR(be.MatMul({g.view, h.view, gup.view, true, false, TensorView{}}));
        FERRY_RETURN_IF_ERROR(be.MatMul({g.view, uw.view, gh.view, false, false, TensorView{}}));
        FERRY_RETURN_IF_ERROR(be.MatMul({gh.view, xb.view, gdown.view, true, false, TensorView{}}));
        ++adam_step;
        const float c1 = 1.0f - std::pow(b1, static_cast<float>(adam_step)), c2 = 1.0f - std::pow(b2, static_cast<float>(adam_step));
        const Weight* grads[3] = {&gdown, &gup, &gbias};
        const Weight* weights[3] = {&dw, &uw, &bw};
        for (int i = 0; i < 3; ++i) {
          FERRY_RETURN_IF_ERROR(be.AdamStep({weights[i]->view, grads[i]->view, moments[2 * i].view, moments[2 * i + 1].view,
                                             o.learning_rate, b1, b2, 1e-8f, c1, c2}));
        }
      }
      for (int64_t c0 = 0; c0 < held; c0 += chunk) {
        const int64_t c = std::min(chunk, held - c0);
        const TensorView cx = TensorView::Contiguous(hx.view.data, DType::kF32, {c, d}, be.device()),
                         ch = TensorView::Contiguous(hh.view.data, DType::kF32, {c, r}, be.device()),
                         cz = TensorView::Contiguous(hz.view.data, DType::kF32, {c, F}, be.device());
        FERRY_RETURN_IF_ERROR(be.CopyToDevice(cx.data, L.x.data() + (n_train + c0) * d, cx.bytes()));
        FERRY_RETURN_IF_ERROR(be.MatMul({cx, dw.view, ch, false, true, TensorView{}}));
        FERRY_RETURN_IF_ERROR(be.MatMul({ch, uw.view, cz, false, true, bw.view}));
        FERRY_RETURN_IF_ERROR(be.CopyToHost(z_held.data() + c0 * F, cz.data, cz.bytes()));
      }
      const double recall = RecallAtK(z_held, L, n_train, meta.tokens, F, k);
      if (o.progress) o.progress(absl::StrFormat("layer %d epoch %d: held-out recall at %.0f%% = %.4f", l, epoch + 1, 100 * o.k_fraction, recall));
      if (recall > best) {
        FERRY_RETURN_IF_ERROR(be.CopyToHost(down.data(), dw.view.data, dw.view.bytes()));
        FERRY_RETURN_IF_ERROR(be.CopyToHost(up.data(), uw.view.data, uw.view.bytes()));
        FERRY_RETURN_IF_ERROR(be.CopyToHost(bias.data(), bw.view.data, bw.view.bytes()));
        best = recall, best_down = down, best_up = up, best_bias = bias, since_best = 0;
      } else {
        ++since_best;  // early stop after two epochs without a better recall
      }
    }
    ls.recall_at_k = best;
    keep_down[l] = std::move(best_down), keep_up[l] = std::move(best_up), keep_bias[l] = std::move(best_bias);
    result.push_back(ls);
  }
  std::vector<io::TensorToWrite> tensors;
  json cfg = {{"rank", r}, {"hidden", d}, {"ffn", F}, {"k_fraction", o.k_fraction}, {"layers", json::array()}};
  for (const LayerSparsity& ls : result) {
    cfg["layers"].push_back({{"layer", ls.layer}, {"mode", ls.dense ? "dense" : "predicted"},
                             {"active_fraction", ls.active_fraction}, {"recall_at_k", ls.recall_at_k}});
    if (ls.dense) continue;
    const std::string p = absl::StrCat("layers.", ls.layer, ".");
    tensors.push_back({p + "down", DType::kF32, {r, d}, keep_down[ls.layer].data()});
    tensors.push_back({p + "up", DType::kF32, {F, r}, keep_up[ls.layer].data()});
    tensors.push_back({p + "bias", DType::kF32, {F}, keep_bias[ls.layer].data()});
  }
  FERRY_RETURN_IF_ERROR(io::WriteSafetensors(out_dir + "/predictors.safetensors", tensors));
  std::ofstream out(out_dir + "/sparsity.json");
  out << cfg.dump(1) << "\n";
  if (!out) return absl::DataLossError(absl::StrCat("cannot write ", out_dir, "/sparsity.json"));
  return result;
}

absl::StatusOr<SparseFfn> SparseFfn::Load(const std::string& dir, const ModelConfig& config) {
  FERRY_RETURN_IF_ERROR(RequireRelu(config));
  FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/sparsity.json"));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError(absl::StrCat(dir, "/sparsity.json is not JSON"));
  SparseFfn s;
  s.d_ = j.value("hidden", 0), s.ffn_ = j.value("ffn", 0), s.rank_ = j.value("rank", 0);
  s.k_fraction_ = j.value("k_fraction", 0.15);
  if (s.d_ != config.hidden_size || s.ffn_ != config.ffn_dim || s.rank_ <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": predictors were trained for another model shape"));
  }
  FERRY_ASSIGN_OR_RETURN(auto file, io::SafetensorsFile::Open(dir + "/predictors.safetensors"));
  s.down_.resize(config.num_layers), s.up_.resize(config.num_layers), s.bias_.resize(config.num_layers);
  for (const auto& layer : j.value("layers", json::array())) {
    if (layer.value("mode", std::string()) != "predicted") continue;
    const int l = layer.value("layer", -1);
    if (l < 0 || l >= config.num_layers) return absl::DataLossError(absl::StrCat(dir, ": layer ", l, " out of range"));
    const std::string p = absl::StrCat("layers.", l, ".");
    const std::pair<const char*, std::vector<float>*> parts[] = {{"down", &s.down_[l]}, {"up", &s.up_[l]}, {"bias", &s.bias_[l]}};
    for (const auto& [name, dst] : parts) {
      const io::TensorInfo* t = file->Find(p + name);
      if (t == nullptr || t->dtype != DType::kF32) return absl::DataLossError(absl::StrCat(dir, ": missing F32 ", p, name));
      dst->resize(static_cast<size_t>(t->numel()));
      FERRY_RETURN_IF_ERROR(file->Read(*t, dst->data(), dst->size() * sizeof(float)));
    }
    if (s.down_[l].size() != static_cast<size_t>(s.rank_) * s.d_ || s.up_[l].size() != static_cast<size_t>(s.ffn_) * s.rank_ ||
        s.bias_[l].size() != static_cast<size_t>(s.ffn_)) {
      return absl::DataLossError(absl::StrCat(dir, ": predictor of layer ", l, " has the wrong shape"));
    }
  }
  return s;
}

absl::StatusOr<std::vector<float>> SparseFfn::Scores(int layer, const float* x, int64_t tokens) const {
  // z = up (down x) + bias, host memory, through the CPU backend's GEMM (the trainer's).
  kernels::CpuBackend cpu;
  auto view = [](const float* p, std::initializer_list<int64_t> shape) {
    return TensorView::Contiguous(const_cast<float*>(p), DType::kF32, shape);
  };
  std::vector<float> h(static_cast<size_t>(tokens) * rank_), z(static_cast<size_t>(tokens) * ffn_);
  FERRY_RETURN_IF_ERROR(cpu.MatMul({view(x, {tokens, d_}), view(down_[layer].data(), {rank_, d_}), view(h.data(), {tokens, rank_}), false,
                                    true, TensorView{}}));
  FERRY_RETURN_IF_ERROR(cpu.MatMul({view(h.data(), {tokens, rank_}), view(up_[layer].data(), {ffn_, rank_}),
                                    view(z.data(), {tokens, ffn_}), false, true, view(bias_[layer].data(), {ffn_})}));
  return z;
}

namespace {

// Sets keep[j] = 1 for the k highest scores of z (ties: the lower index); idx is scratch.
void MarkTopK(const float* z, int ffn, int k, std::vector<int>& idx, uint8_t* keep) {
  idx.resize(static_cast<size_t>(ffn));
  std::iota(idx.begin(), idx.end(), 0);
  std::nth_element(idx.begin(), idx.begin() + k, idx.end(), [&](int p, int q) { return z[p] > z[q] || (z[p] == z[q] && p < q); });
  for (int i = 0; i < k; ++i) keep[idx[i]] = 1;
}

}  // namespace

int SparseFfn::kept_per_token() const { return std::max(1, static_cast<int>(std::lround(k_fraction_ * ffn_))); }

std::function<absl::Status(int, const TensorView&, const TensorView&)> SparseFfn::Hook(kernels::Backend* backend) const {
  return [this, backend](int layer, const TensorView& x, const TensorView& act) -> absl::Status {
    if (!predicted(layer)) return absl::OkStatus();
    const int64_t n = x.shape[0];
    const int k = kept_per_token();
    std::vector<float> x_host, act_host;
    FERRY_ASSIGN_OR_RETURN(const float* xs, HostFloats(backend, x, x_host));
    FERRY_ASSIGN_OR_RETURN(float* a, HostFloats(backend, act, act_host));
    FERRY_ASSIGN_OR_RETURN(const std::vector<float> z, Scores(layer, xs, n));
    ThreadPool::Default().ParallelFor(n, 4, [&](int64_t t0, int64_t t1) {
      std::vector<int> idx;
      std::vector<uint8_t> keep(ffn_);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(keep.begin(), keep.end(), 0);
        MarkTopK(z.data() + t * ffn_, ffn_, k, idx, keep.data());
        for (int j = 0; j < ffn_; ++j) {
          if (!keep[j]) a[t * ffn_ + j] = 0.0f;
        }
      }
    });
    if (act.device != Device::kCpu) return backend->CopyToDevice(act.data, a, act.bytes());  // the edited copy goes back
    return absl::OkStatus();
  };
}

FfnSelector SparseFfn::Selector(kernels::Backend& backend) const {
  return [this, &backend](int layer, const TensorView& x) -> absl::StatusOr<std::vector<int32_t>> {
    std::vector<int32_t> all;
    if (!predicted(layer)) {
      all.resize(static_cast<size_t>(ffn_));
      std::iota(all.begin(), all.end(), 0);
      return all;
    }
    const int64_t n = x.shape[0];
    std::vector<float> host;
    FERRY_ASSIGN_OR_RETURN(const float* xs, HostFloats(&backend, x, host));
    FERRY_ASSIGN_OR_RETURN(const std::vector<float> z, Scores(layer, xs, n));
    std::vector<uint8_t> keep(static_cast<size_t>(ffn_), 0);
    std::vector<int> idx;
    for (int64_t t = 0; t < n; ++t) MarkTopK(z.data() + t * ffn_, ffn_, kept_per_token(), idx, keep.data());  // Hook()'s top-k
    for (int j = 0; j < ffn_; ++j) {
      if (keep[j]) all.push_back(j);
    }
    return all;
  };
}

FfnSelector RandomFfnSelector(int ffn, double density, uint64_t seed) {
  auto calls = std::make_shared<uint64_t>(0);
  return [ffn, density, seed, calls](int layer, const TensorView& x) -> absl::StatusOr<std::vector<int32_t>> {
    const int64_t n = x.shape[0];
    const int k = std::clamp(static_cast<int>(std::lround(density * ffn)), 1, ffn);
    std::mt19937_64 rng(seed ^ (0x9e3779b97f4a7c15ull * (++*calls)) ^ (static_cast<uint64_t>(layer) << 32));
    std::vector<int32_t> perm(static_cast<size_t>(ffn));
    std::iota(perm.begin(), perm.end(), 0);
    std::vector<uint8_t> keep(static_cast<size_t>(ffn), 0);
    for (int64_t t = 0; t < n; ++t) {
      for (int i = 0; i < k; ++i) {  // partial Fisher-Yates: k distinct neurons
        std::uniform_int_distribution<int> pick(i, ffn - 1);
        std::swap(perm[i], perm[pick(rng)]);
        keep[perm[i]] = 1;
      }
    }
    std::vector<int32_t> out;
    for (int j = 0; j < ffn; ++j) {
      if (keep[j]) out.push_back(j);
    }
    return out;
  };
}

AdaptiveFfnSelector::AdaptiveFfnSelector(FfnSelector inner, int layers, int ffn, double dense_above, int probe)
    : inner_(std::move(inner)), ffn_(ffn), probe_(probe), dense_above_(dense_above), calls_(layers, 0), sum_(layers, 0.0) {}

absl::StatusOr<std::vector<int32_t>> AdaptiveFfnSelector::operator()(int layer, const TensorView& attn_in) {
  if (layer < 0 || layer >= static_cast<int>(calls_.size())) return absl::InvalidArgumentError("selector: layer out of range");
  if (calls_[layer] >= probe_ && sum_[layer] / calls_[layer] >= dense_above_) {
    std::vector<int32_t> all(static_cast<size_t>(ffn_));
    std::iota(all.begin(), all.end(), 0);
    return all;
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<int32_t> chosen, inner_(layer, attn_in));
  if (calls_[layer] < probe_) {
    ++calls_[layer];
    sum_[layer] += static_cast<double>(chosen.size()) / ffn_;
  }
  return chosen;
}

std::vector<int> AdaptiveFfnSelector::dense_layers() const {
  std::vector<int> out;
  for (size_t l = 0; l < calls_.size(); ++l) {
    if (calls_[l] >= probe_ && sum_[l] / calls_[l] >= dense_above_) out.push_back(static_cast<int>(l));
  }
  return out;
}

double AdaptiveFfnSelector::probed_fraction(int layer) const {
  return calls_[layer] > 0 ? sum_[layer] / calls_[layer] : -1.0;
}

absl::StatusOr<SparsityReport> ReportSparsity(const std::string& data_dir, const SparseFfn* predictors, double k_fraction) {
  FERRY_ASSIGN_OR_RETURN(Meta meta, ReadMeta(data_dir));
  SparsityReport rep;
  const int64_t windows = meta.tokens / meta.window;
  for (int l = 0; l < meta.layers; ++l) {
    FERRY_ASSIGN_OR_RETURN(LayerData L, ReadLayer(data_dir, meta, l));
    rep.active_fraction.push_back(meta.active[l]);
    double recall = -1;
    if (predictors != nullptr && predictors->predicted(l)) {
      const int k = std::max(1, static_cast<int>(std::lround(k_fraction * meta.ffn)));
      FERRY_ASSIGN_OR_RETURN(const std::vector<float> z, predictors->Scores(l, L.x.data(), meta.tokens));
      recall = RecallAtK(z, L, 0, meta.tokens, meta.ffn, k);
    }
    rep.recall.push_back(recall);
    // Union over a decode batch: B tokens at the same position of B different sequences (windows).
    std::vector<double> fractions;
    for (int B : rep.union_batch) {
      const int64_t groups = windows / B;
      if (groups == 0) {
        fractions.push_back(-1);
        continue;
      }
      double sum = 0;
      int64_t count = 0;
      std::vector<uint8_t> any(static_cast<size_t>(L.row_bytes));
      for (int64_t g = 0; g < groups; ++g) {
        for (int t = 0; t < meta.window; t += 8) {
          std::fill(any.begin(), any.end(), 0);
          for (int b = 0; b < B; ++b) {
            const int64_t tok = (g * B + b) * meta.window + t;
            for (int64_t i = 0; i < L.row_bytes; ++i) any[i] |= L.bits[tok * L.row_bytes + i];
          }
          int64_t active = 0;
          for (uint8_t byte : any) active += __builtin_popcount(byte);
          sum += static_cast<double>(active) / meta.ffn;
          ++count;
        }
      }
      fractions.push_back(sum / count);
    }
    rep.union_fraction.push_back(fractions);
  }
  return rep;
}

std::string SparsityReport::Table() const {
  std::string s = "layer  active  recall@k";
  for (int B : union_batch) s += absl::StrFormat("  union B=%-3d", B);
  s += "\n";
  for (size_t l = 0; l < active_fraction.size(); ++l) {
    s += absl::StrFormat("%5zu  %6.3f  %8s", l, active_fraction[l], recall[l] < 0 ? "dense" : absl::StrFormat("%.3f", recall[l]));
    for (double f : union_fraction[l]) s += f < 0 ? "          -" : absl::StrFormat("  %10.3f", f);
    s += "\n";
  }
  return s;
}

}  // namespace ferry::engine
