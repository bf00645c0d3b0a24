// OptModel's offloaded side: loading from a store through the layer streamer, the memory plan,
// and the sparse FFN's row-column bundles (built from the store, kept pinned or in the store's
// ffn_bundles.bin, gathered per layer for the chosen neurons).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "engine/opt_model.h"
#include "engine/opt_model_internal.h"
#include "io/store.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

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
  FERRY_ASSIGN_OR_RETURN(m->plan_, PlanOffload(store, options, *backend));  // refuses before any allocation

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
// Rows of the device-side bundle cache per layer.
int64_t CacheRows(const OptConfig& c, const OffloadOptions& o) {
  const double fraction = std::clamp(o.sparse_cache_fraction, 0.0, 1.0);
  return static_cast<int64_t>(std::llround(fraction * c.ffn_dim));
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
  cache_rows_ = CacheRows(c, options);
  if (cache_rows_ > 0) {
    for (int l = 0; l < c.num_layers; ++l) {
      BundleCache cache;
      FERRY_ASSIGN_OR_RETURN(cache.rows, backend_->Allocate(static_cast<size_t>(cache_rows_) * bundle_bytes_));
      cache.neuron_of.assign(static_cast<size_t>(cache_rows_), -1);
      cache.slot_of.assign(static_cast<size_t>(f), -1);
      cache.last_used.assign(static_cast<size_t>(cache_rows_), 0);
      caches_.push_back(std::move(cache));
    }
  }
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
  // With the device-side cache, a partial selection splits into the neurons found there (hits,
  // copied on the device) and the rest (misses, fetched); the gathered rows are the misses, then
  // the hits (BundledFfn sums over its rows in any order).
  const bool cached = cache_rows_ > 0 && m < f;
  std::vector<int32_t> misses, hit_slots;
  if (cached) {
    const BundleCache& cache = caches_[layer];
    for (int32_t j : neurons) {
      if (cache.slot_of[j] >= 0) {
        hit_slots.push_back(cache.slot_of[j]);
      } else {
        misses.push_back(j);
      }
    }
  }
  const std::vector<int32_t>& fetch = cached ? misses : neurons;
  const int64_t nf = static_cast<int64_t>(fetch.size());
  if (nf > 0) {
    if (bundle_reader_ != nullptr) FERRY_RETURN_IF_ERROR(ReadBundlePages(layer, fetch));
    const void* table = bundle_reader_ != nullptr ? staging_.data() : bundles_[layer].data();
    // One gather, in stream order: the FFN that read gather_ last is done before it is rewritten.
    FERRY_RETURN_IF_ERROR(backend_->GatherHostRows(table, bundle_bytes_, fetch, gather_.data()));
    if (bundle_reader_ != nullptr) {
      FERRY_ASSIGN_OR_RETURN(staging_fence_, backend_->RecordFence());
    }
  }
  bundle_bytes_moved_ += static_cast<uint64_t>(nf) * bundle_bytes_;
  if (cached) {
    BundleCache& cache = caches_[layer];
    const uint64_t now = ++cache_clock_;
    cache_hits_ += hit_slots.size();
    cache_misses_ += misses.size();
    std::vector<int32_t> to(hit_slots.size());
    for (size_t i = 0; i < to.size(); ++i) {
      to[i] = static_cast<int32_t>(nf + static_cast<int64_t>(i));
      cache.last_used[hit_slots[i]] = now;
    }
    FERRY_RETURN_IF_ERROR(backend_->CopyRows(cache.rows.data(), gather_.data(), bundle_bytes_, hit_slots, to));
    // The fetched rows (gather_ rows 0.. of the misses) go into the slots they were given.
    const std::vector<int32_t> slots = cache.Admit(misses, now);
    std::vector<int32_t> from(slots.size());
    std::iota(from.begin(), from.end(), 0);
    FERRY_RETURN_IF_ERROR(backend_->CopyRows(gather_.data(), cache.rows.data(), bundle_bytes_, from, slots));
  }
  return MakeView(gather_.data(), matrix_dtype_, {m, bundle_stride_}, backend_->device());
}

std::vector<int32_t> OptModel::BundleCache::Admit(const std::vector<int32_t>& neurons, uint64_t now) {
  std::vector<int32_t> victims;
  for (int32_t slot = 0; slot < static_cast<int32_t>(neuron_of.size()); ++slot) {
    if (last_used[slot] != now) victims.push_back(slot);
  }
  const size_t take = std::min(victims.size(), neurons.size());
  std::nth_element(victims.begin(), victims.begin() + static_cast<int64_t>(take), victims.end(),
                   [&](int32_t a, int32_t b) { return last_used[a] < last_used[b] || (last_used[a] == last_used[b] && a < b); });
  victims.resize(take);
  for (size_t i = 0; i < take; ++i) {
    const int32_t slot = victims[i];
    if (neuron_of[slot] >= 0) slot_of[neuron_of[slot]] = -1;
    neuron_of[slot] = neurons[i];
    slot_of[neurons[i]] = slot;
    last_used[slot] = now;
  }
  return victims;
}

absl::Status OptModel::ReadBundlePages(int layer, const std::vector<int32_t>& neurons) const {
  // The pages that hold the bundles land in the staging mirror of the layer's region at their own
  // offsets, so the gather finds neuron j at j * bundle_bytes_.
  if (staging_fence_ != nullptr) FERRY_RETURN_IF_ERROR(staging_fence_->Wait());  // the last gather read staging_
  std::vector<io::UringReader::ReadExtent> extents;
  const uint64_t page = io::kStoreAlignment, base = static_cast<uint64_t>(layer) * layer_stride_;
  char* staging = static_cast<char*>(staging_.data());
  const int64_t n = static_cast<int64_t>(neurons.size());
  for (int64_t i = 0; i < n;) {
    int64_t e = i + 1;
    while (e < n && neurons[e] == neurons[e - 1] + 1) ++e;
    const uint64_t first = static_cast<uint64_t>(neurons[i]) * bundle_bytes_ / page;
    const uint64_t last = (static_cast<uint64_t>(neurons[e - 1] + 1) * bundle_bytes_ + page - 1) / page;  // exclusive
    if (!extents.empty() && extents.back().offset + extents.back().n >= base + first * page) {
      extents.back().n = static_cast<size_t>(base + last * page - extents.back().offset);
    } else {
      extents.push_back({base + first * page, staging + first * page, static_cast<size_t>((last - first) * page)});
    }
    i = e;
  }
  FERRY_RETURN_IF_ERROR(bundle_reader_->ReadMany(bundle_file_, extents));
  for (const auto& x : extents) bundle_disk_bytes_read_ += x.n;
  return absl::OkStatus();
}

absl::StatusOr<offload::Plan> OptModel::PlanOffload(const io::Store& store, const OffloadOptions& options,
                                                    const kernels::Backend& backend) {
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
    // The device-side cache, and CopyRows' two id lists.
    bundles_device += static_cast<uint64_t>(CacheRows(c, options)) * (bundle * c.num_layers) + 2 * sizeof(int32_t) * c.ffn_dim;
    // Pinned: every layer's bundles (CPU tier), or one layer's staging mirror (disk tier).
    bundles_host = options.split.disk > 0.0 ? BundleLayerStride(c, fc1->info.dtype) : bundle * c.ffn_dim * c.num_layers;
  } else {
    for (const auto& region : store.layers()) in.layer_bytes.push_back(region.bytes);
  }
  in.split = options.split;
  in.other_device_bytes = resident_other + options.reserve_device_bytes + bundles_device + backend.reserved_device_bytes();
  in.other_host_bytes = options.reserve_host_bytes + bundles_host;
  in.device_budget = options.device_budget;
  in.host_budget = options.host_budget;
  return offload::MakePlan(in);
}

}  // namespace ferry::engine
