// Model loading: a resident model from a checkpoint or store, an offloaded one through the layer
// streamer (the plan checked against the budgets before anything is allocated), and the plan.
#include <algorithm>
#include <array>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "engine/model.h"
#include "io/store.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using offload::Role;

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

bool IsFloatWeight(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Refuses a checkpoint with layers beyond config.json's num_hidden_layers (a config that would
// silently drop layers).
absl::Status CheckLayerCount(const ModelConfig& c, const TensorNames& names, const io::TensorSource& src) {
  for (const std::string& name : src.Names()) {
    Role role;
    int layer = -1;
    if (names.RoleOf(name, &role, &layer) && layer >= c.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("the checkpoint has tensor \"", name, "\" of layer ", layer,
                                                     " but config.json says num_hidden_layers = ", c.num_layers));
    }
  }
  return absl::OkStatus();
}

// Sparse FFN: per layer, the range [begin, end) of its region that holds the attention matrices
// (4 KiB-aligned), which must not overlap FC1 or FC2 (those stay out of the stream).
absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> AttentionRanges(const io::Store& store, const TensorNames& names,
                                                                           int layers) {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (int l = 0; l < layers; ++l) {
    const io::StoreLayer& region = store.layers()[l];
    uint64_t begin = region.bytes, end = 0;
    const Role roles[6] = {Role::kQ, Role::kK, Role::kV, Role::kO, Role::kUp, Role::kDown};
    std::array<const io::StoreTensor*, 6> t{};
    for (int i = 0; i < 6; ++i) {
      t[i] = store.FindTensor(names.Layer(roles[i], l));
      if (t[i] == nullptr || t[i]->info.offset < region.offset) return absl::NotFoundError(absl::StrCat("store lacks layer ", l, "'s matrices"));
    }
    for (int i = 0; i < 4; ++i) {
      begin = std::min(begin, t[i]->info.offset - region.offset);
      end = std::max(end, t[i]->info.offset - region.offset + t[i]->info.bytes);
    }
    begin = begin / io::kStoreAlignment * io::kStoreAlignment;
    end = std::min<uint64_t>((end + io::kStoreAlignment - 1) / io::kStoreAlignment * io::kStoreAlignment, region.bytes);
    for (int i = 4; i < 6; ++i) {
      const uint64_t at = t[i]->info.offset - region.offset;
      if (at < end && at + t[i]->info.bytes > begin) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the store interleaves layer ", l, "'s FFN and attention matrices, so the FFN cannot stay out of the stream "
            "(stores from ferry convert and --dummy keep them apart)"));
      }
    }
    ranges.push_back({begin, end});
  }
  return ranges;
}

absl::Status RefuseSparseSwiGlu(const ModelConfig& c) {
  if (c.ffn == FfnKind::kRelu) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "Deja Vu sparsity needs a ReLU FFN; this ", c.model_type,
      " model has a SwiGLU FFN (activation sparsity for SwiGLU models is not supported yet)"));
}

absl::Status RefuseSparseSwiGluRole() {
  return absl::InvalidArgumentError(
      "Deja Vu sparsity needs a ReLU FFN; this model has a SwiGLU FFN (activation sparsity for SwiGLU models is not supported yet)");
}

offload::FfnBundleLayout BundleLayout(const ModelConfig& c, const TensorNames& names, DType dtype,
                                      const std::optional<QuantFormat>& quant) {
  offload::FfnBundleLayout layout;
  layout.d = c.hidden_size;
  layout.ffn = c.ffn_dim;
  layout.dtype = dtype;
  layout.quant = quant;
  for (int l = 0; l < c.num_layers; ++l) {
    layout.up.push_back(names.Layer(Role::kUp, l));
    layout.up_bias.push_back(names.Layer(Role::kUpBias, l));
    layout.down.push_back(names.Layer(Role::kDown, l));
  }
  return layout;
}

}  // namespace

namespace {

// What converting `model_dir` reads and how: its config, its tensors (a GGUF file's dequantized, or
// the safetensors), the side files of a GGUF file, and the options with each tensor's role and,
// with gguf.quantize, which matrices are quantized. ConvertModel writes it; PlanConvertedTensors
// lays it out.
struct Conversion {
  ModelConfig config;
  std::optional<GgufModel> gguf;
  std::unique_ptr<io::TensorSource> source;  // the safetensors (when not GGUF)
  std::map<std::string, std::string> side;    // GGUF: config.json, tokenizer files
  io::ConvertOptions options;
  const io::TensorSource& tensors() const { return gguf ? *gguf->tensors : *source; }
};

absl::StatusOr<Conversion> PrepareConversion(const std::string& model_dir, io::ConvertOptions options, const GgufLoadOptions& gguf) {
  Conversion conv;
  std::optional<TensorNames> names;
  if (IsGgufFile(model_dir)) {
    FERRY_ASSIGN_OR_RETURN(GgufModel g, OpenGgufModel(model_dir, gguf));
    FERRY_ASSIGN_OR_RETURN(const Family* family, FindFamily(g.config.model_type, model_dir));
    names = TensorNames::WithPrefix(*family, family->prefixes.front());
    FERRY_RETURN_IF_ERROR(CheckLayerCount(g.config, *names, *g.tensors));
    conv.config = g.config;
    conv.side = {{"config.json", g.config_json}, {"tokenizer.json", g.tokenizer_json}};
    if (!g.chat_template.empty()) conv.side["tokenizer_config.json"] = nlohmann::json({{"chat_template", g.chat_template}}).dump(1);
    conv.gguf = std::move(g);
  } else {
    FERRY_ASSIGN_OR_RETURN(conv.config, ModelConfig::FromModelDir(model_dir));
    FERRY_ASSIGN_OR_RETURN(const Family* family, FindFamily(conv.config.model_type, model_dir + "/config.json"));
    FERRY_ASSIGN_OR_RETURN(conv.source, io::OpenTensorSource(model_dir));
    FERRY_ASSIGN_OR_RETURN(names, TensorNames::Resolve(*family, *conv.source));
    FERRY_RETURN_IF_ERROR(CheckLayerCount(conv.config, *names, *conv.source));
  }
  options.role_of = [names = *names](const std::string& name) {
    Role role;
    int layer = -1;
    return names.RoleOf(name, &role, &layer) ? std::string(offload::RoleName(role)) : std::string();
  };
  if (gguf.quantize) {
    // The layer matrices (the streamed bytes) are quantized; embeddings, heads and vectors keep theirs.
    options.quantize = gguf.quantize;
    options.quantize_tensor = [role_of = options.role_of](const std::string& name) { return IsQuantizedRole(role_of(name)); };
  }
  conv.options = std::move(options);
  return conv;
}

}  // namespace

absl::Status ConvertModel(const std::string& model_dir, const std::string& out_dir, io::ConvertOptions options,
                          const GgufLoadOptions& gguf) {
  FERRY_ASSIGN_OR_RETURN(Conversion conv, PrepareConversion(model_dir, std::move(options), gguf));
  if (conv.gguf) return io::ConvertToStore(*conv.gguf->tensors, conv.side, out_dir, conv.options);
  conv.source.reset();  // ConvertToStore opens the directory itself (and copies its side files)
  return io::ConvertToStore(model_dir, out_dir, conv.options);
}

absl::StatusOr<std::pair<ModelConfig, std::vector<io::PlannedTensor>>> PlanConvertedTensors(const std::string& model_dir,
                                                                                             const GgufLoadOptions& gguf) {
  FERRY_ASSIGN_OR_RETURN(Conversion conv, PrepareConversion(model_dir, {}, gguf));
  FERRY_ASSIGN_OR_RETURN(std::vector<io::PlannedTensor> planned, io::PlanConversion(conv.tensors(), conv.options));
  return std::make_pair(conv.config, std::move(planned));
}

absl::Status CheckStoreModel(const io::Store& store) {
  FERRY_ASSIGN_OR_RETURN(const ModelConfig c, ModelConfig::FromModelDir(store.dir()));
  FERRY_ASSIGN_OR_RETURN(const Family* family, FindFamily(c.model_type, store.dir() + "/config.json"));
  FERRY_ASSIGN_OR_RETURN(const TensorNames names, TensorNames::Resolve(*family, store));
  FERRY_RETURN_IF_ERROR(CheckLayerCount(c, names, store));
  if (static_cast<int>(store.layers().size()) != c.num_layers) {
    return absl::DataLossError(absl::StrCat(store.dir(), ": the store has ", store.layers().size(), " layer regions, config.json ",
                                            c.num_layers, " layers"));
  }
  auto check = [&](const RoleSpec& r, const std::string& name) -> absl::Status {
    const io::TensorInfo* t = store.Find(name);
    if (t == nullptr) return absl::DataLossError(absl::StrCat(store.dir(), ": the store lacks tensor \"", name, "\""));
    if (t->shape != r.shape || (t->quant ? !r.matrix || r.role == Role::kLmHead || r.role == Role::kTokEmbed : !IsFloatWeight(t->dtype))) {
      return absl::DataLossError(absl::StrCat(store.dir(), ": tensor \"", name, "\" has shape ", ShapeStr(t->shape), " ",
                                              DTypeName(t->dtype), "; config.json implies ", ShapeStr(r.shape)));
    }
    return absl::OkStatus();
  };
  for (const RoleSpec& r : GlobalRoles(c)) FERRY_RETURN_IF_ERROR(check(r, names.Global(r.role)));
  for (int l = 0; l < c.num_layers; ++l) {
    for (const RoleSpec& r : LayerRoles(c)) FERRY_RETURN_IF_ERROR(check(r, names.Layer(r.role, l)));
  }
  return absl::OkStatus();
}

absl::StatusOr<Weight> Model::Alloc(DType dtype, std::initializer_list<int64_t> shape) const {
  return AllocWeight(*backend_, dtype, shape);
}

absl::StatusOr<Weight> Model::LoadTensor(const io::TensorSource& src, const std::string& name, const std::vector<int64_t>& shape,
                                         bool as_f32, const std::optional<QuantFormat>& quantize) {
  const io::TensorInfo* info = src.Find(name);
  if (info == nullptr) return absl::NotFoundError(absl::StrCat("checkpoint lacks tensor \"", name, "\""));
  if (info->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" has shape ", ShapeStr(info->shape),
                                                   " but config.json implies ", ShapeStr(shape)));
  }
  if (info->quant) {
    // A quantized store's matrix: its region as it is.
    if (shape.size() != 2 || as_f32) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" is quantized (", QuantFormatName(*info->quant),
                                                     ") but only layer matrices may be"));
    }
    if (quantize && !(*quantize == *info->quant)) {
      return absl::InvalidArgumentError(absl::StrCat("the model's matrices are already ", QuantFormatName(*info->quant),
                                                     "; --quantize ", QuantFormatName(*quantize), " needs a float checkpoint"));
    }
    std::vector<char> q(info->bytes);
    FERRY_RETURN_IF_ERROR(src.Read(name, q.data(), q.size()));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend_->Allocate(q.size()));
    FERRY_RETURN_IF_ERROR(backend_->CopyToDevice(buf.data(), q.data(), q.size()));
    TensorView view = MakeView(buf.data(), DType::kU8, shape, backend_->device());
    view.quant = *info->quant;
    return Weight{std::move(buf), view};
  }
  if (!IsFloatWeight(info->dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" has dtype ", DTypeName(info->dtype),
                                                   "; weights must be F32, F16 or BF16"));
  }
  std::vector<char> host(info->bytes);
  FERRY_RETURN_IF_ERROR(src.Read(name, host.data(), host.size()));
  DType dtype = info->dtype;
  if (quantize) {
    auto layout = LayoutQuantized(*quantize, shape[0], shape[1]);
    if (!layout.ok()) return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\": ", layout.status().message()));
    std::vector<float> w(static_cast<size_t>(info->numel()));
    ConvertToF32(dtype, host.data(), w.data(), w.size());
    std::vector<uint8_t> q(layout->bytes);
    QuantizeRows(*quantize, *layout, w.data(), shape[0], shape[1], q.data());
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend_->Allocate(q.size()));
    FERRY_RETURN_IF_ERROR(backend_->CopyToDevice(buf.data(), q.data(), q.size()));
    TensorView view = MakeView(buf.data(), DType::kU8, shape, backend_->device());
    view.quant = *quantize;
    return Weight{std::move(buf), view};
  }
  if (as_f32 && dtype != DType::kF32) {
    std::vector<char> converted(static_cast<size_t>(info->numel()) * sizeof(float));
    ConvertToF32(dtype, host.data(), reinterpret_cast<float*>(converted.data()), static_cast<size_t>(info->numel()));
    host.swap(converted);
    dtype = DType::kF32;
  }
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, backend_->Allocate(host.size()));
  FERRY_RETURN_IF_ERROR(backend_->CopyToDevice(buf.data(), host.data(), host.size()));
  TensorView view = MakeView(buf.data(), dtype, shape, backend_->device());
  return Weight{std::move(buf), view};
}

absl::Status Model::LoadResident(const io::TensorSource& src, bool matrices, const std::optional<QuantFormat>& quantize) {
  for (const RoleSpec& r : GlobalRoles(config_)) {
    const std::string name = names_.Global(r.role);
    if (r.role == Role::kLmHead && src.Find(name) == nullptr) {
      return absl::NotFoundError(absl::StrCat("config.json sets tie_word_embeddings false but the checkpoint lacks \"", name, "\""));
    }
    FERRY_ASSIGN_OR_RETURN(Weight w, LoadTensor(src, name, r.shape, !r.matrix));
    weights_.SetGlobal(r.role, std::move(w));
  }
  const std::vector<RoleSpec> roles = LayerRoles(config_);
  for (int l = 0; l < config_.num_layers; ++l) {
    for (const RoleSpec& r : roles) {
      if (r.matrix && !matrices) continue;
      FERRY_ASSIGN_OR_RETURN(Weight w, LoadTensor(src, names_.Layer(r.role, l), r.shape, !r.matrix,
                                                  r.matrix ? quantize : std::nullopt));
      weights_.SetLayer(l, r.role, std::move(w));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir, kernels::Backend* backend, const GgufLoadOptions& gguf) {
  std::unique_ptr<Model> m(new Model());
  m->backend_ = backend;
  std::unique_ptr<io::TensorSource> source;
  if (IsGgufFile(dir)) {
    FERRY_ASSIGN_OR_RETURN(GgufModel g, OpenGgufModel(dir, gguf));
    m->config_ = g.config;
    source = std::move(g.tensors);
  } else {
    FERRY_ASSIGN_OR_RETURN(m->config_, ModelConfig::FromModelDir(dir));
    FERRY_ASSIGN_OR_RETURN(source, io::OpenTensorSource(dir));
  }
  FERRY_ASSIGN_OR_RETURN(m->family_, FindFamily(m->config_.model_type, dir + "/config.json"));
  FERRY_ASSIGN_OR_RETURN(m->names_, TensorNames::Resolve(*m->family_, *source));
  FERRY_RETURN_IF_ERROR(CheckLayerCount(m->config_, m->names_, *source));
  m->weights_ = offload::ModelWeights(m->config_.num_layers);
  FERRY_RETURN_IF_ERROR(m->LoadResident(*source, /*matrices=*/true, gguf.quantize));
  return m;
}

absl::StatusOr<std::unique_ptr<Model>> Model::LoadOffloaded(const std::string& store_dir, kernels::Backend* backend,
                                                            const OffloadOptions& options) {
  std::unique_ptr<Model> m(new Model());
  m->backend_ = backend;
  FERRY_ASSIGN_OR_RETURN(m->config_, ModelConfig::FromModelDir(store_dir));
  const ModelConfig& c = m->config_;
  if (options.sparse_ffn) FERRY_RETURN_IF_ERROR(RefuseSparseSwiGlu(c));
  if (!PathExists(store_dir + "/manifest.json")) {
    return absl::InvalidArgumentError(absl::StrCat(store_dir, " is not a ferry store: offloading reads a store (ferry convert)"));
  }
  FERRY_ASSIGN_OR_RETURN(m->family_, FindFamily(c.model_type, store_dir + "/config.json"));
  FERRY_ASSIGN_OR_RETURN(io::Store store, io::Store::Open(store_dir));
  FERRY_ASSIGN_OR_RETURN(m->names_, TensorNames::Resolve(*m->family_, store));
  FERRY_RETURN_IF_ERROR(CheckLayerCount(c, m->names_, store));
  if (static_cast<int>(store.layers().size()) != c.num_layers) {
    return absl::DataLossError(absl::StrCat(store_dir, ": the store has ", store.layers().size(), " layers, config.json ", c.num_layers));
  }
  // Every matrix must lie in its layer's block, with its shape and one 16/32-bit float dtype or one
  // quantized format.
  std::vector<std::vector<offload::StreamedTensor>> streamed(static_cast<size_t>(c.num_layers));
  DType matrix_dtype = DType::kF16;
  std::optional<QuantFormat> matrix_quant;
  bool first = true;
  for (int l = 0; l < c.num_layers; ++l) {
    const io::StoreLayer& region = store.layers()[l];
    for (const RoleSpec& r : LayerRoles(c)) {
      if (!r.matrix) continue;
      const std::string name = m->names_.Layer(r.role, l);
      const io::StoreTensor* t = store.FindTensor(name);
      if (t == nullptr) return absl::NotFoundError(absl::StrCat("store lacks tensor \"", name, "\""));
      if (!t->role.empty() && t->role != offload::RoleName(r.role)) {
        return absl::DataLossError(absl::StrCat("tensor \"", name, "\" is recorded as ", t->role, ", not ", offload::RoleName(r.role)));
      }
      if (t->info.shape != r.shape || t->info.offset < region.offset || t->info.offset + t->info.bytes > region.offset + region.bytes) {
        return absl::DataLossError(absl::StrCat("tensor \"", name, "\" has the wrong shape or lies outside its layer"));
      }
      if (first) {
        matrix_dtype = t->info.dtype;
        matrix_quant = t->info.quant;
      }
      first = false;
      if (t->info.dtype != matrix_dtype || t->info.quant != matrix_quant || (!t->info.quant && !IsFloatWeight(t->info.dtype))) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\": layer matrices must share one float dtype or quantized format"));
      }
      if (options.sparse_ffn && (r.role == Role::kUp || r.role == Role::kDown)) continue;  // bundles instead
      streamed[l].push_back({r.role, t->info.offset - region.offset, t->info.dtype, r.shape, t->info.quant});
    }
  }
  FERRY_ASSIGN_OR_RETURN(m->plan_, PlanOffload(store, options, *backend));  // refuses before any allocation

  m->weights_ = offload::ModelWeights(c.num_layers);
  FERRY_RETURN_IF_ERROR(m->LoadResident(store, /*matrices=*/false));
  if (options.sparse_ffn) {
    offload::FfnBundleOptions bo{options.split.disk > 0.0, options.sparse_cache_fraction, options.streamer.uring};
    FERRY_ASSIGN_OR_RETURN(m->bundles_, offload::FfnBundles::Create(backend, store, BundleLayout(c, m->names_, matrix_dtype, matrix_quant), bo));
  }
  for (int l = 0; l < c.num_layers; ++l) {
    for (offload::StreamedTensor& t : streamed[l]) t.offset -= m->plan_.layers[l].begin;
  }
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<offload::LayerStreamer> streamer,
                         offload::LayerStreamer::Create(backend, store, m->plan_, options.streamer));
  m->weights_.SetStreamed(std::move(streamer), std::move(streamed));
  return m;
}

bool IsQuantizedRole(const std::string& role) {
  for (Role r : {Role::kQ, Role::kK, Role::kV, Role::kO, Role::kGate, Role::kUp, Role::kDown}) {
    if (role == offload::RoleName(r)) return true;
  }
  return false;
}

namespace {

// Per layer, the extent of the attention matrices and of the FFN's (offsets in the layer region).
struct LayerExtents {
  uint64_t attn_begin = UINT64_MAX, attn_end = 0, ffn_begin = UINT64_MAX, ffn_end = 0;
};

// The attention ranges of LayoutOf from each layer's extents; empty if any layer interleaves them
// or lacks a role.
std::vector<std::pair<uint64_t, uint64_t>> RangesOf(const std::vector<LayerExtents>& ext, const std::vector<uint64_t>& layer_bytes) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (size_t l = 0; l < ext.size() && l < layer_bytes.size(); ++l) {
    const LayerExtents& e = ext[l];
    if (e.attn_end == 0 || e.ffn_end == 0) return {};
    const uint64_t begin = e.attn_begin / io::kStoreAlignment * io::kStoreAlignment;
    const uint64_t end = std::min<uint64_t>((e.attn_end + io::kStoreAlignment - 1) / io::kStoreAlignment * io::kStoreAlignment, layer_bytes[l]);
    if (e.ffn_begin < end && e.ffn_end > begin) return {};
    out.push_back({begin, end});
  }
  if (out.size() != layer_bytes.size()) return {};
  return out;
}

void AddExtent(const std::string& role, uint64_t at, uint64_t bytes, LayerExtents* e) {
  if (role == offload::RoleName(Role::kQ) || role == offload::RoleName(Role::kK) || role == offload::RoleName(Role::kV) ||
      role == offload::RoleName(Role::kO)) {
    e->attn_begin = std::min(e->attn_begin, at);
    e->attn_end = std::max(e->attn_end, at + bytes);
  } else if (role == offload::RoleName(Role::kUp) || role == offload::RoleName(Role::kDown) || role == offload::RoleName(Role::kGate)) {
    e->ffn_begin = std::min(e->ffn_begin, at);
    e->ffn_end = std::max(e->ffn_end, at + bytes);
  }
}

// One tensor into a layout: `layer` its decoder layer (-1: none).
void AddToLayout(const io::PlannedTensor& t, int layer, uint64_t bytes, WeightLayout* w) {
  const bool matrix = t.shape.size() == 2;
  int64_t numel = 1;
  for (int64_t d : t.shape) numel *= d;
  if (layer < 0 || !matrix) w->resident_other += t.shape.size() == 1 ? static_cast<uint64_t>(numel) * 4 : bytes;
  if (layer >= 0 && matrix && t.quant) {
    w->largest_quantized = std::max<uint64_t>(w->largest_quantized, static_cast<uint64_t>(numel));
    w->quant = t.quant;
  }
  if (layer == 0 && matrix) w->layer_matrices.push_back(t);
  if (layer < 0 && matrix) w->global_matrices.push_back(t);
}

}  // namespace

WeightLayout LayoutOf(const io::StoreLayout& layout) {
  WeightLayout w;
  std::vector<LayerExtents> ext(layout.layers.size());
  for (size_t i = 0; i < layout.order.size(); ++i) {
    const int layer = io::LayerOfTensor(layout.order[i].name);
    AddToLayout(layout.order[i], layer, layout.bytes[i], &w);
    if (layer >= 0 && static_cast<size_t>(layer) < ext.size() && layout.offsets[i] >= layout.layers[layer].offset) {
      AddExtent(layout.order[i].role, layout.offsets[i] - layout.layers[layer].offset, layout.bytes[i], &ext[layer]);
    }
  }
  for (const io::StoreLayer& l : layout.layers) w.layer_bytes.push_back(l.bytes);
  w.attention_ranges = RangesOf(ext, w.layer_bytes);
  return w;
}

absl::StatusOr<WeightLayout> LayoutOf(const io::Store& store) {
  WeightLayout w;
  std::vector<LayerExtents> ext(store.layers().size());
  for (const std::string& name : store.Names()) {
    const io::StoreTensor* t = store.FindTensor(name);
    AddToLayout({name, t->info.dtype, t->info.shape, t->role, t->info.quant}, t->layer, t->info.bytes, &w);
    if (t->layer >= 0 && static_cast<size_t>(t->layer) < ext.size() && t->info.offset >= store.layers()[t->layer].offset) {
      AddExtent(t->role, t->info.offset - store.layers()[t->layer].offset, t->info.bytes, &ext[t->layer]);
    }
  }
  for (const auto& region : store.layers()) w.layer_bytes.push_back(region.bytes);
  w.attention_ranges = RangesOf(ext, w.layer_bytes);
  return w;
}

std::vector<io::PlannedTensor> PlannedTensorsOf(const io::Store& store, const std::optional<QuantFormat>& format) {
  std::vector<io::PlannedTensor> out;
  for (const std::string& name : store.Names()) {
    const io::StoreTensor* t = store.FindTensor(name);
    io::PlannedTensor p{name, t->info.dtype, t->info.shape, t->role, t->info.quant};
    if (format && !t->info.quant && t->layer >= 0 && t->info.shape.size() == 2 && IsQuantizedRole(t->role)) {
      p.dtype = DType::kU8;
      p.quant = format;
    }
    out.push_back(std::move(p));
  }
  return out;
}

absl::StatusOr<offload::Plan> Model::PlanOffload(const WeightLayout& layout, const OffloadOptions& options,
                                                 const kernels::Backend& backend) {
  // What stays resident besides the layer matrices, and on the GPU the fp16 dequantization scratch
  // of the largest quantized matrix (batches above kFusedQuantRows).
  const uint64_t dequant_scratch = backend.device() == Device::kCuda ? layout.largest_quantized * 2 : 0;
  offload::PlanInputs in;
  in.layer_bytes = layout.layer_bytes;
  in.split = options.split;
  in.other_device_bytes = layout.resident_other + dequant_scratch + options.reserve_device_bytes + backend.reserved_device_bytes();
  in.other_host_bytes = options.reserve_host_bytes;
  if (options.sparse_ffn) {
    // Deja Vu: only each layer's attention part streams; the FFN lives as neuron bundles (pinned,
    // or in ffn_bundles.bin with a disk share) with one layer's gather buffer and the device cache
    // on the GPU.
    const io::PlannedTensor* up = nullptr;
    for (const io::PlannedTensor& t : layout.layer_matrices) {
      if (t.role == offload::RoleName(Role::kGate)) return RefuseSparseSwiGluRole();
      if (t.role == offload::RoleName(Role::kUp)) up = &t;
    }
    if (up == nullptr || up->shape.size() != 2) return absl::InvalidArgumentError("Deja Vu sparsity needs the layers' FFN up matrices");
    if (layout.attention_ranges.size() != layout.layer_bytes.size()) {
      return absl::InvalidArgumentError(
          "the store interleaves the layers' FFN and attention matrices, so the FFN cannot stay out of the stream "
          "(stores from ferry convert and --dummy keep them apart)");
    }
    const int layers = static_cast<int>(layout.layer_bytes.size());
    const int ffn = static_cast<int>(up->shape[0]), d = static_cast<int>(up->shape[1]);
    if (up->quant && offload::FfnBundles::BundleBytes(d, up->dtype, up->quant) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Deja Vu sparsity on a ", QuantFormatName(*up->quant), " store needs the group to divide the hidden size ", d));
    }
    in.layer_begin.clear();
    in.layer_bytes.clear();
    for (const auto& [begin, end] : layout.attention_ranges) {
      in.layer_begin.push_back(begin);
      in.layer_bytes.push_back(end - begin);
    }
    in.other_device_bytes += offload::FfnBundles::DeviceBytes(layers, d, ffn, up->dtype, options.sparse_cache_fraction, up->quant);
    in.other_host_bytes += offload::FfnBundles::HostBytes(layers, d, ffn, up->dtype, options.split.disk > 0.0, up->quant);
  }
  in.device_budget = options.device_budget;
  in.host_budget = options.host_budget;
  return offload::MakePlan(in);
}

absl::StatusOr<offload::Plan> Model::PlanOffload(const io::Store& store, const OffloadOptions& options,
                                                 const kernels::Backend& backend) {
  FERRY_ASSIGN_OR_RETURN(WeightLayout layout, LayoutOf(store));
  if (!options.sparse_ffn) return PlanOffload(layout, options, backend);
  // The store's config and family names decide (the layout's roles may be absent in old stores).
  FERRY_ASSIGN_OR_RETURN(const ModelConfig c, ModelConfig::FromModelDir(store.dir()));
  FERRY_RETURN_IF_ERROR(RefuseSparseSwiGlu(c));
  if (static_cast<int>(store.layers().size()) != c.num_layers) return absl::DataLossError("the store's layer count differs from config.json");
  FERRY_ASSIGN_OR_RETURN(const Family* family, FindFamily(c.model_type, store.dir()));
  FERRY_ASSIGN_OR_RETURN(const TensorNames names, TensorNames::Resolve(*family, store));
  FERRY_ASSIGN_OR_RETURN(layout.attention_ranges, AttentionRanges(store, names, c.num_layers));
  const io::StoreTensor* up = store.FindTensor(names.Layer(Role::kUp, 0));
  if (up == nullptr) return absl::DataLossError(absl::StrCat("the store lacks ", names.Layer(Role::kUp, 0)));
  // Layer 0's up matrix by name, first among the layout's matrices, so the bundles are sized from it.
  io::PlannedTensor up_planned{names.Layer(Role::kUp, 0), up->info.dtype, up->info.shape, offload::RoleName(Role::kUp), up->info.quant};
  std::erase_if(layout.layer_matrices, [](const io::PlannedTensor& t) { return t.role == offload::RoleName(Role::kUp); });
  layout.layer_matrices.insert(layout.layer_matrices.begin(), up_planned);
  return PlanOffload(layout, options, backend);
}

}  // namespace ferry::engine
