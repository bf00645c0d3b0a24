#include "engine/opt_model.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "io/store.h"
#include "nlohmann/json.hpp"

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

namespace {

constexpr const char* kMatrixNames[6] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "fc1", "fc2"};

std::string DecoderPrefix(const io::TensorSource& src) {
  if (src.Find("model.decoder.embed_tokens.weight") == nullptr && src.Find("decoder.embed_tokens.weight") != nullptr) {
    return "decoder.";
  }
  return "model.decoder.";
}

// Sparse FFN: per layer, the range [begin, end) of its region that holds the four attention
// matrices (4 KiB-aligned), which must not overlap FC1 or FC2 (those stay out of the stream).
absl::StatusOr<std::vector<std::pair<uint64_t, uint64_t>>> AttentionRanges(const io::Store& store, int layers) {
  const std::string prefix = DecoderPrefix(store);
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (int l = 0; l < layers; ++l) {
    const io::StoreLayer& region = store.layers()[l];
    uint64_t begin = region.bytes, end = 0;
    std::array<const io::StoreTensor*, 6> t{};
    for (int i = 0; i < 6; ++i) {
      t[i] = store.FindTensor(absl::StrCat(prefix, "layers.", l, ".", kMatrixNames[i], ".weight"));
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

}  // namespace

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

namespace {

std::vector<int64_t> MatrixShape(const OptConfig& c, int i) {
  const int64_t d = c.hidden_size, f = c.ffn_dim;
  if (i == 4) return {f, d};
  if (i == 5) return {d, f};
  return {d, d};
}

}  // namespace

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

absl::StatusOr<std::unique_ptr<OptModel>> OptModel::LoadOffloaded(const std::string& store_dir, kernels::Backend* backend,
                                                                  const OffloadOptions& options) {
  std::unique_ptr<OptModel> m(new OptModel());
  m->backend_ = backend;
  FERRY_ASSIGN_OR_RETURN(m->config_, OptConfig::FromModelDir(store_dir));
  if (!PathExists(store_dir + "/manifest.json")) {
    return absl::InvalidArgumentError(absl::StrCat(store_dir, " is not a ferry store: offloading reads a store (ferry convert)"));
  }
  FERRY_ASSIGN_OR_RETURN(io::Store store, io::Store::Open(store_dir));
  const OptConfig& c = m->config_;
  const std::string prefix = DecoderPrefix(store);
  if (static_cast<int>(store.layers().size()) != c.num_layers) {
    return absl::DataLossError(absl::StrCat(store_dir, ": the store has ", store.layers().size(), " layers, config.json ", c.num_layers));
  }
  // Every matrix must lie in its layer's block, with the shape and one 16/32-bit float dtype.
  for (int l = 0; l < c.num_layers; ++l) {
    const io::StoreLayer& region = store.layers()[l];
    std::array<uint64_t, 6> offsets{};
    for (int i = 0; i < 6; ++i) {
      const std::string name = absl::StrCat(prefix, "layers.", l, ".", kMatrixNames[i], ".weight");
      const io::StoreTensor* t = store.FindTensor(name);
      if (t == nullptr) return absl::NotFoundError(absl::StrCat("store lacks tensor \"", name, "\""));
      if (t->info.shape != MatrixShape(c, i) || t->info.offset < region.offset ||
          t->info.offset + t->info.bytes > region.offset + region.bytes) {
        return absl::DataLossError(absl::StrCat("tensor \"", name, "\" has the wrong shape or lies outside its layer"));
      }
      if (l == 0 && i == 0) m->matrix_dtype_ = t->info.dtype;
      if (t->info.dtype != m->matrix_dtype_ || (t->info.dtype != DType::kF16 && t->info.dtype != DType::kBF16 &&
                                                t->info.dtype != DType::kF32)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\": layer matrices must share one float dtype"));
      }
      offsets[i] = t->info.offset - region.offset;
    }
    m->matrix_offsets_.push_back(offsets);
  }
  FERRY_ASSIGN_OR_RETURN(m->plan_, PlanOffload(store, options));  // refuses before any allocation

  FERRY_RETURN_IF_ERROR(m->LoadGlobals(store, prefix));
  for (int l = 0; l < c.num_layers; ++l) {
    OptLayerWeights L;
    FERRY_RETURN_IF_ERROR(m->LoadLayerVectors(store, absl::StrCat(prefix, "layers.", l, "."), &L));
    m->layers_.push_back(std::move(L));
  }
  if (options.sparse_ffn) FERRY_RETURN_IF_ERROR(m->LoadBundles(store, prefix, options));
  for (const auto& l : m->plan_.layers) m->stream_begin_.push_back(l.begin);
  FERRY_ASSIGN_OR_RETURN(m->streamer_, offload::LayerStreamer::Create(backend, store, m->plan_, options.streamer));
  return m;
}

absl::Status OptModel::BuildLayerBundles(const io::Store& store, const std::string& prefix, int layer, char* dst) const {
  const OptConfig& c = config_;
  const int64_t d = c.hidden_size, f = c.ffn_dim;
  const size_t es = DTypeSize(matrix_dtype_);
  std::vector<char> w1(static_cast<size_t>(f * d) * es), w2(static_cast<size_t>(d * f) * es);
  std::vector<float> b1(static_cast<size_t>(f));
  std::vector<char> b1_native(static_cast<size_t>(f) * es);
  const std::string p = absl::StrCat(prefix, "layers.", layer, ".");
  FERRY_RETURN_IF_ERROR(store.Read(p + "fc1.weight", w1.data(), w1.size()));
  FERRY_RETURN_IF_ERROR(store.Read(p + "fc2.weight", w2.data(), w2.size()));
  const io::TensorInfo* bias = store.Find(p + "fc1.bias");
  if (bias == nullptr || bias->numel() != f) return absl::NotFoundError(absl::StrCat("store lacks ", p, "fc1.bias of ", f, " values"));
  std::vector<char> raw(bias->bytes);
  FERRY_RETURN_IF_ERROR(store.Read(p + "fc1.bias", raw.data(), raw.size()));
  ConvertToF32(bias->dtype, raw.data(), b1.data(), static_cast<size_t>(f));
  ConvertFromF32(matrix_dtype_, b1.data(), b1_native.data(), static_cast<size_t>(f));
  std::memset(dst, 0, static_cast<size_t>(f) * bundle_bytes_);
  // Blocks of 64 neurons: FC2's columns are read as 64-value runs of its rows (a cache-friendly
  // transpose) rather than one strided value at a time.
  constexpr int64_t kBlock = 64;
  ThreadPool::Default().ParallelFor((f + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t j0 = blk * kBlock, j1 = std::min(f, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j) {
        char* bundle = dst + static_cast<size_t>(j) * bundle_bytes_;
        std::memcpy(bundle, w1.data() + static_cast<size_t>(j * d) * es, static_cast<size_t>(d) * es);
        std::memcpy(bundle + static_cast<size_t>(d) * es, b1_native.data() + static_cast<size_t>(j) * es, es);
      }
      for (int64_t i = 0; i < d; ++i) {
        const char* row = w2.data() + static_cast<size_t>(i * f) * es;
        for (int64_t j = j0; j < j1; ++j) {
          std::memcpy(dst + static_cast<size_t>(j) * bundle_bytes_ + static_cast<size_t>(d + 1 + i) * es,
                      row + static_cast<size_t>(j) * es, es);
        }
      }
    }
  });
  return absl::OkStatus();
}

namespace {

// Bytes of one bundle (2d + 1 values, padded to 16 bytes) and of one layer's bundles on disk
// (4 KiB-aligned, so every layer starts on a page).
uint64_t BundleBytes(const OptConfig& c, DType dtype) {
  return (static_cast<uint64_t>(2 * c.hidden_size + 1) * DTypeSize(dtype) + 15) / 16 * 16;
}
uint64_t BundleLayerStride(const OptConfig& c, DType dtype) {
  return (BundleBytes(c, dtype) * c.ffn_dim + io::kStoreAlignment - 1) / io::kStoreAlignment * io::kStoreAlignment;
}

}  // namespace

absl::Status OptModel::LoadBundles(const io::Store& store, const std::string& prefix, const OffloadOptions& options) {
  const OptConfig& c = config_;
  const int64_t f = c.ffn_dim;
  const size_t es = DTypeSize(matrix_dtype_);
  sparse_ = true;
  // Each bundle padded to a 16-byte multiple: aligned rows for the gather and the GEMMs.
  bundle_bytes_ = BundleBytes(c, matrix_dtype_);
  bundle_stride_ = static_cast<int64_t>(bundle_bytes_ / es);
  if (options.split.disk <= 0.0) {
    for (int l = 0; l < c.num_layers; ++l) {
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer pinned, backend_->AllocateHost(static_cast<size_t>(f) * bundle_bytes_));
      FERRY_RETURN_IF_ERROR(BuildLayerBundles(store, prefix, l, static_cast<char*>(pinned.data())));
      bundles_.push_back(std::move(pinned));
    }
  } else {
    // The disk tier: the bundles live in the store's ffn_bundles.bin (written once, beside the
    // weights) and each gather reads only the pages that hold the chosen neurons.
    layer_stride_ = BundleLayerStride(c, matrix_dtype_);
    const std::string path = store.dir() + "/ffn_bundles.bin", stamp_path = store.dir() + "/ffn_bundles.json";
    const uint64_t want = layer_stride_ * c.num_layers;
    // The file is derived from the store's FC1/FC2 tensors: its stamp records their checksums and
    // the layout, and any difference (a reconverted store, a torn write) rebuilds it.
    nlohmann::json stamp = {{"bundle_bytes", bundle_bytes_}, {"layer_stride", layer_stride_}, {"layers", c.num_layers},
                            {"ffn", f}, {"dtype", DTypeName(matrix_dtype_)}};
    for (int l = 0; l < c.num_layers; ++l) {
      for (const char* t : {"fc1.weight", "fc1.bias", "fc2.weight"}) {
        const io::StoreTensor* st = store.FindTensor(absl::StrCat(prefix, "layers.", l, ".", t));
        if (st == nullptr) return absl::NotFoundError(absl::StrCat("store lacks ", prefix, "layers.", l, ".", t));
        stamp["xxh3"].push_back(st->xxh3);
      }
    }
    auto existing = io::ReadFile::Open(path, /*want_direct=*/false);
    auto old_stamp = ReadFileToString(stamp_path);
    if (!existing.ok() || existing->size != want || !old_stamp.ok() ||
        nlohmann::json::parse(*old_stamp, nullptr, false) != stamp) {
      ::unlink(stamp_path.c_str());  // no stamp while the file is being rewritten
      const std::string tmp = path + ".tmp";
      ScopedFd out(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      if (out.get() < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", tmp, " (the sparse FFN's bundles for the disk tier)"));
      std::vector<char> layer(layer_stride_, 0);
      for (int l = 0; l < c.num_layers; ++l) {
        FERRY_RETURN_IF_ERROR(BuildLayerBundles(store, prefix, l, layer.data()));
        FERRY_RETURN_IF_ERROR(PwriteFull(out.get(), layer.data(), layer.size(), static_cast<uint64_t>(l) * layer_stride_, tmp));
      }
      if (::fsync(out.get()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("fsync ", tmp));
      if (::rename(tmp.c_str(), path.c_str()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("rename ", tmp));
      FERRY_RETURN_IF_ERROR(WriteFileAtomically(stamp_path, stamp.dump()));
    }
    FERRY_ASSIGN_OR_RETURN(bundle_file_, io::ReadFile::Open(path, /*want_direct=*/true));
    FERRY_ASSIGN_OR_RETURN(staging_, backend_->AllocateHost(layer_stride_));
    io::UringOptions uo = options.streamer.uring;
    uo.registered = {{staging_.data(), staging_.bytes()}};
    auto reader = io::UringReader::Create(uo);
    if (!reader.ok()) {
      uo.registered.clear();
      reader = io::UringReader::Create(uo);
    }
    if (!reader.ok()) return reader.status();
    bundle_reader_ = std::move(*reader);
  }
  FERRY_ASSIGN_OR_RETURN(gather_, backend_->Allocate(static_cast<size_t>(f) * bundle_bytes_));
  return absl::OkStatus();
}

absl::StatusOr<TensorView> OptModel::GatherBundles(int layer, const std::vector<int32_t>& neurons) const {
  const int64_t f = config_.ffn_dim, m = static_cast<int64_t>(neurons.size());
  for (int64_t i = 0; i < m; ++i) {
    if (neurons[i] < 0 || neurons[i] >= f || (i > 0 && neurons[i] <= neurons[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat("ffn_select for layer ", layer, " must return distinct neurons in [0, ", f,
                                                     ") in increasing order"));
    }
  }
  const void* table = nullptr;
  if (bundle_reader_ == nullptr) {
    table = bundles_[layer].data();
  } else {
    // Read the pages that hold the chosen bundles into the staging mirror of the layer's region,
    // at their own offsets, so the gather below finds neuron j at j * bundle_bytes_.
    if (staging_fence_ != nullptr) FERRY_RETURN_IF_ERROR(staging_fence_->Wait());  // the last gather read staging_
    std::vector<io::UringReader::ReadExtent> extents;
    const uint64_t page = io::kStoreAlignment, base = static_cast<uint64_t>(layer) * layer_stride_;
    char* staging = static_cast<char*>(staging_.data());
    for (int64_t i = 0; i < m;) {
      int64_t e = i + 1;
      while (e < m && neurons[e] == neurons[e - 1] + 1) ++e;
      const uint64_t first = static_cast<uint64_t>(neurons[i]) * bundle_bytes_ / page;
      const uint64_t last = (static_cast<uint64_t>(neurons[e - 1] + 1) * bundle_bytes_ + page - 1) / page;  // exclusive
      if (!extents.empty() && extents.back().offset + extents.back().n >= base + first * page) {
        extents.back().n = static_cast<size_t>(base + last * page - extents.back().offset);
      } else {
        extents.push_back({base + first * page, staging + first * page, static_cast<size_t>((last - first) * page)});
      }
      i = e;
    }
    uint64_t bytes = 0;
    for (const auto& x : extents) bytes += x.n;
    FERRY_RETURN_IF_ERROR(bundle_reader_->ReadMany(bundle_file_, extents));
    bundle_disk_bytes_read_ += bytes;
    table = staging;
  }
  // One gather, in stream order: the FFN that read gather_ last is done before it is rewritten.
  FERRY_RETURN_IF_ERROR(backend_->GatherHostRows(table, bundle_bytes_, neurons, gather_.data()));
  if (bundle_reader_ != nullptr) {
    FERRY_ASSIGN_OR_RETURN(staging_fence_, backend_->RecordFence());
  }
  bundle_bytes_moved_ += static_cast<uint64_t>(m) * bundle_bytes_;
  return MakeView(gather_.data(), matrix_dtype_, {m, bundle_stride_}, backend_->device());
}

absl::StatusOr<offload::Plan> OptModel::PlanOffload(const io::Store& store, const OffloadOptions& options) {
  uint64_t resident_other = 0;  // what stays resident besides the layer matrices; vectors as fp32
  for (const std::string& name : store.Names()) {
    const io::StoreTensor* t = store.FindTensor(name);
    const bool matrix = t->layer >= 0 && t->info.shape.size() == 2;
    if (!matrix) resident_other += t->info.shape.size() == 1 ? static_cast<uint64_t>(t->info.numel()) * 4 : t->info.bytes;
  }
  offload::PlanInputs in;
  uint64_t bundles_host = 0, bundles_device = 0;
  if (options.sparse_ffn) {
    FERRY_ASSIGN_OR_RETURN(const OptConfig c, OptConfig::FromModelDir(store.dir()));
    if (static_cast<int>(store.layers().size()) != c.num_layers) return absl::DataLossError("the store's layer count differs from config.json");
    FERRY_ASSIGN_OR_RETURN(const auto ranges, AttentionRanges(store, c.num_layers));
    for (const auto& [begin, end] : ranges) {
      in.layer_begin.push_back(begin);
      in.layer_bytes.push_back(end - begin);
    }
    const io::StoreTensor* fc1 = store.FindTensor(absl::StrCat(DecoderPrefix(store), "layers.0.fc1.weight"));
    const uint64_t bundle = BundleBytes(c, fc1->info.dtype);
    bundles_device = (bundle + sizeof(int32_t)) * c.ffn_dim;  // one layer's worth of fetched bundles and their ids
    // Pinned: every layer's bundles (CPU tier), or one layer's staging mirror (disk tier).
    bundles_host = options.split.disk > 0.0 ? BundleLayerStride(c, fc1->info.dtype) : bundle * c.ffn_dim * c.num_layers;
  } else {
    for (const auto& region : store.layers()) in.layer_bytes.push_back(region.bytes);
  }
  in.split = options.split;
  in.other_device_bytes = resident_other + options.reserve_device_bytes + bundles_device;
  in.other_host_bytes = options.reserve_host_bytes + bundles_host;
  in.device_budget = options.device_budget;
  in.host_budget = options.host_budget;
  return offload::MakePlan(in);
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

uint64_t OptModel::KvCacheBytes(const OptConfig& c, int64_t rows, int64_t max_len) {
  return 2ull * c.num_layers * static_cast<uint64_t>(rows) * static_cast<uint64_t>(max_len) * c.hidden_size * sizeof(float);
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
