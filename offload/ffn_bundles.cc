#include "offload/ffn_bundles.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "nlohmann/json.hpp"

namespace ferry::offload {

uint64_t FfnBundles::BundleBytes(int d, DType dtype, const std::optional<QuantFormat>& quant) {
  if (quant) {
    auto layout = LayoutQuantBundle(*quant, d);
    return layout.ok() ? layout->bytes : 0;
  }
  return (static_cast<uint64_t>(2 * d + 1) * DTypeSize(dtype) + 15) / 16 * 16;
}

uint64_t FfnBundles::LayerStride(int d, int ffn, DType dtype, const std::optional<QuantFormat>& quant) {
  return (BundleBytes(d, dtype, quant) * ffn + io::kStoreAlignment - 1) / io::kStoreAlignment * io::kStoreAlignment;
}

int64_t FfnBundles::CacheRows(int ffn, double fraction) {
  return static_cast<int64_t>(std::llround(std::clamp(fraction, 0.0, 1.0) * ffn));
}

uint64_t FfnBundles::DeviceBytes(int layers, int d, int ffn, DType dtype, double cache_fraction, const std::optional<QuantFormat>& quant) {
  const uint64_t bundle = BundleBytes(d, dtype, quant);
  // One layer's worth of fetched bundles and their ids, the device-side cache, CopyRows' two id
  // lists; quantized: the fp16 [ffn, 2d] the GEMM path dequantizes them into.
  const uint64_t dequant = quant ? static_cast<uint64_t>(ffn) * 2 * static_cast<uint64_t>(d) * 2 : 0;
  return (bundle + sizeof(int32_t)) * ffn + static_cast<uint64_t>(CacheRows(ffn, cache_fraction)) * bundle * layers +
         2 * sizeof(int32_t) * ffn + dequant;
}

uint64_t FfnBundles::HostBytes(int layers, int d, int ffn, DType dtype, bool on_disk, const std::optional<QuantFormat>& quant) {
  // Every layer's bundles (CPU tier), or one layer's staging mirror (disk tier).
  return on_disk ? LayerStride(d, ffn, dtype, quant) : BundleBytes(d, dtype, quant) * ffn * layers;
}

absl::Status FfnBundles::BuildLayer(const io::Store& store, int layer, char* dst) const {
  if (layout_.quant) return BuildQuantizedLayer(store, layer, dst);
  const int64_t d = layout_.d, f = layout_.ffn;
  const DType dtype = layout_.dtype;
  const size_t es = DTypeSize(dtype);
  std::vector<char> w1(static_cast<size_t>(f * d) * es), w2(static_cast<size_t>(d * f) * es);
  std::vector<float> b1(static_cast<size_t>(f));
  std::vector<char> b1_native(static_cast<size_t>(f) * es);
  FERRY_RETURN_IF_ERROR(store.Read(layout_.up[layer], w1.data(), w1.size()));
  FERRY_RETURN_IF_ERROR(store.Read(layout_.down[layer], w2.data(), w2.size()));
  const io::TensorInfo* bias = store.Find(layout_.up_bias[layer]);
  if (bias == nullptr || bias->numel() != f) {
    return absl::NotFoundError(absl::StrCat("store lacks ", layout_.up_bias[layer], " of ", f, " values"));
  }
  std::vector<char> raw(bias->bytes);
  FERRY_RETURN_IF_ERROR(store.Read(layout_.up_bias[layer], raw.data(), raw.size()));
  ConvertToF32(bias->dtype, raw.data(), b1.data(), static_cast<size_t>(f));
  ConvertFromF32(dtype, b1.data(), b1_native.data(), static_cast<size_t>(f));
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

absl::Status FfnBundles::BuildQuantizedLayer(const io::Store& store, int layer, char* dst) const {
  const int64_t d = layout_.d, f = layout_.ffn;
  const QuantFormat q = *layout_.quant;
  FERRY_ASSIGN_OR_RETURN(const BundleQuantLayout bl, LayoutQuantBundle(q, d));
  FERRY_ASSIGN_OR_RETURN(const QuantLayout up, LayoutQuantized(q, f, d));
  FERRY_ASSIGN_OR_RETURN(const QuantLayout down, LayoutQuantized(q, d, f));
  const std::vector<int64_t> up_shape = {f, d}, down_shape = {d, f};
  for (const auto& [name, shape] : {std::pair{&layout_.up[layer], &up_shape}, std::pair{&layout_.down[layer], &down_shape}}) {
    const io::TensorInfo* t = store.Find(*name);
    const uint64_t want = name == &layout_.up[layer] ? up.bytes : down.bytes;
    if (t == nullptr || !t->quant || !(*t->quant == q) || t->shape != *shape || t->bytes != want) {
      return absl::DataLossError(absl::StrCat("store tensor ", *name, " is not the ", QuantFormatName(q), " matrix its layer needs"));
    }
  }
  std::vector<uint8_t> w1(up.bytes), w2(down.bytes);
  FERRY_RETURN_IF_ERROR(store.Read(layout_.up[layer], w1.data(), w1.size()));
  FERRY_RETURN_IF_ERROR(store.Read(layout_.down[layer], w2.data(), w2.size()));
  const io::TensorInfo* bias = store.Find(layout_.up_bias[layer]);
  if (bias == nullptr || bias->numel() != f || bias->quant) {
    return absl::NotFoundError(absl::StrCat("store lacks ", layout_.up_bias[layer], " of ", f, " values"));
  }
  std::vector<char> raw(bias->bytes);
  std::vector<float> b1(static_cast<size_t>(f));
  FERRY_RETURN_IF_ERROR(store.Read(layout_.up_bias[layer], raw.data(), raw.size()));
  ConvertToF32(bias->dtype, raw.data(), b1.data(), static_cast<size_t>(f));
  std::vector<float> w2f(static_cast<size_t>(d * f));
  DequantizeRows(q, down, w2.data(), f, 0, d, w2f.data());
  std::memset(dst, 0, static_cast<size_t>(f) * bundle_bytes_);
  const size_t row_values = q.kind == QuantKind::kQ4 ? static_cast<size_t>(d) / 2 : static_cast<size_t>(d);
  const size_t groups = static_cast<size_t>(d / q.group);
  ThreadPool::Default().ParallelFor(f, 16, [&](int64_t j0, int64_t j1) {
    std::vector<float> col(static_cast<size_t>(d));
    for (int64_t j = j0; j < j1; ++j) {
      uint8_t* bundle = reinterpret_cast<uint8_t*>(dst) + static_cast<size_t>(j) * bundle_bytes_;
      // FC1 row j: the store's codes, scales and minimums as they are (no second rounding).
      std::memcpy(bundle, w1.data() + static_cast<size_t>(j) * row_values, row_values);
      std::memcpy(bundle + bl.row.scales_offset, w1.data() + up.scales_offset + static_cast<size_t>(j) * groups * 2, groups * 2);
      if (q.kind == QuantKind::kQ4) {
        std::memcpy(bundle + bl.row.mins_offset, w1.data() + up.mins_offset + static_cast<size_t>(j) * groups * 2, groups * 2);
      }
      // FC2 column j, requantized along d.
      for (int64_t i = 0; i < d; ++i) col[static_cast<size_t>(i)] = w2f[static_cast<size_t>(i * f + j)];
      QuantizeSpan(q, bl.row, col.data(), 2 * d, 0, d, d, bundle);
      std::memcpy(bundle + bl.bias_offset, &b1[static_cast<size_t>(j)], sizeof(float));
    }
  });
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<FfnBundles>> FfnBundles::Create(kernels::Backend* backend, const io::Store& store,
                                                                const FfnBundleLayout& layout, const FfnBundleOptions& options) {
  std::unique_ptr<FfnBundles> b(new FfnBundles());
  b->backend_ = backend;
  b->layout_ = layout;
  const int layers = static_cast<int>(layout.up.size());
  const int64_t f = layout.ffn;
  const size_t es = DTypeSize(layout.dtype);
  b->bundle_bytes_ = BundleBytes(layout.d, layout.dtype, layout.quant);
  if (b->bundle_bytes_ == 0) {
    return absl::InvalidArgumentError(absl::StrCat("the FFN's ", QuantFormatName(*layout.quant), " groups do not divide the hidden size ",
                                                   layout.d, ": no quantized neuron bundles"));
  }
  b->stride_ = static_cast<int64_t>(layout.quant ? b->bundle_bytes_ : b->bundle_bytes_ / es);
  if (!options.on_disk) {
    for (int l = 0; l < layers; ++l) {
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer pinned, backend->AllocateHost(static_cast<size_t>(f) * b->bundle_bytes_));
      FERRY_RETURN_IF_ERROR(b->BuildLayer(store, l, static_cast<char*>(pinned.data())));
      b->pinned_.push_back(std::move(pinned));
    }
  } else {
    // The disk tier: the bundles live in the store's ffn_bundles.bin (written once, beside the
    // weights) and each gather reads only the pages that hold the chosen neurons.
    b->layer_stride_ = LayerStride(layout.d, layout.ffn, layout.dtype, layout.quant);
    const std::string path = store.dir() + "/ffn_bundles.bin", stamp_path = store.dir() + "/ffn_bundles.json";
    const uint64_t want = b->layer_stride_ * layers;
    // The file is derived from the store's FC1/FC2 tensors: its stamp records their checksums and
    // the layout, and any difference (a reconverted store, a torn write) rebuilds it.
    nlohmann::json stamp = {{"bundle_bytes", b->bundle_bytes_}, {"layer_stride", b->layer_stride_}, {"layers", layers},
                            {"ffn", f}, {"dtype", DTypeName(layout.dtype)},
                            {"quant", layout.quant ? QuantFormatName(*layout.quant) : std::string("none")}};
    for (int l = 0; l < layers; ++l) {
      for (const std::string* t : {&layout.up[l], &layout.up_bias[l], &layout.down[l]}) {
        const io::StoreTensor* st = store.FindTensor(*t);
        if (st == nullptr) return absl::NotFoundError(absl::StrCat("store lacks ", *t));
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
      std::vector<char> region(b->layer_stride_, 0);
      for (int l = 0; l < layers; ++l) {
        FERRY_RETURN_IF_ERROR(b->BuildLayer(store, l, region.data()));
        FERRY_RETURN_IF_ERROR(PwriteFull(out.get(), region.data(), region.size(), static_cast<uint64_t>(l) * b->layer_stride_, tmp));
      }
      if (::fsync(out.get()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("fsync ", tmp));
      if (::rename(tmp.c_str(), path.c_str()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("rename ", tmp));
      FERRY_RETURN_IF_ERROR(WriteFileAtomically(stamp_path, stamp.dump()));
    }
    FERRY_ASSIGN_OR_RETURN(b->file_, io::ReadFile::Open(path, /*want_direct=*/true));
    FERRY_ASSIGN_OR_RETURN(b->staging_, backend->AllocateHost(b->layer_stride_));
    io::UringOptions uo = options.uring;
    uo.registered = {{b->staging_.data(), b->staging_.bytes()}};
    auto reader = io::UringReader::Create(uo);
    if (!reader.ok()) {
      uo.registered.clear();
      reader = io::UringReader::Create(uo);
    }
    if (!reader.ok()) return reader.status();
    b->reader_ = std::move(*reader);
  }
  FERRY_ASSIGN_OR_RETURN(b->gather_, backend->Allocate(static_cast<size_t>(f) * b->bundle_bytes_));
  b->cache_rows_ = CacheRows(layout.ffn, options.cache_fraction);
  if (b->cache_rows_ > 0) {
    for (int l = 0; l < layers; ++l) {
      Cache cache;
      FERRY_ASSIGN_OR_RETURN(cache.rows, backend->Allocate(static_cast<size_t>(b->cache_rows_) * b->bundle_bytes_));
      cache.neuron_of.assign(static_cast<size_t>(b->cache_rows_), -1);
      cache.slot_of.assign(static_cast<size_t>(f), -1);
      cache.last_used.assign(static_cast<size_t>(b->cache_rows_), 0);
      b->caches_.push_back(std::move(cache));
    }
  }
  return b;
}

absl::StatusOr<TensorView> FfnBundles::Gather(int layer, const std::vector<int32_t>& neurons) {
  const int64_t f = layout_.ffn, m = static_cast<int64_t>(neurons.size());
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
    const Cache& cache = caches_[layer];
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
    if (reader_ != nullptr) FERRY_RETURN_IF_ERROR(ReadPages(layer, fetch));
    const void* table = reader_ != nullptr ? staging_.data() : pinned_[layer].data();
    // One gather, in stream order: the FFN that read gather_ last is done before it is rewritten.
    FERRY_RETURN_IF_ERROR(backend_->GatherHostRows(table, bundle_bytes_, fetch, gather_.data()));
    if (reader_ != nullptr) {
      FERRY_ASSIGN_OR_RETURN(staging_fence_, backend_->RecordFence());
    }
  }
  bytes_moved_ += static_cast<uint64_t>(nf) * bundle_bytes_;
  if (cached) {
    Cache& cache = caches_[layer];
    const uint64_t now = ++clock_;
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
  TensorView v = TensorView::Contiguous(gather_.data(), layout_.quant ? DType::kU8 : layout_.dtype, {m, stride_}, backend_->device());
  v.quant = layout_.quant;
  return v;
}

std::vector<int32_t> FfnBundles::Cache::Admit(const std::vector<int32_t>& neurons, uint64_t now) {
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

absl::Status FfnBundles::ReadPages(int layer, const std::vector<int32_t>& neurons) {
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
  FERRY_RETURN_IF_ERROR(reader_->ReadMany(file_, extents));
  for (const auto& x : extents) disk_bytes_read_ += x.n;
  return absl::OkStatus();
}

}  // namespace ferry::offload
