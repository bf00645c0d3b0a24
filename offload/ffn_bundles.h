// Deja Vu's sparse FFN weights: each layer's FFN kept as row-column bundles (neuron j: FC1 row j,
// FC1 bias j, FC2 column j, padded to 16 bytes), so one read fetches a neuron. A q4/q8 store's
// bundles are quantized too (base/quant.h's BundleQuantLayout): FC1's row keeps the store's codes
// and scales as they are; FC2's column is requantized along d from the store's values (the store
// groups FC2 along ffn, across neurons, so no neuron's column is a whole group there: the one place
// ferry rounds twice). The bundles live in
// pinned host memory (the CPU tier) or in the store's ffn_bundles.bin (the disk tier, written once
// beside the weights and stamped with the FFN tensors' checksums; each gather reads only the 4 KiB
// pages that hold the chosen neurons, with io_uring and O_DIRECT). Per layer and call only the
// chosen neurons' bundles cross the link into one device buffer; optionally a device-side cache
// keeps the most recently used bundles (LLM in a flash's window), so only misses cross.
// Gather changes the cache and the counters: it is not const.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "io/store.h"
#include "io/uring_reader.h"
#include "kernels/backend.h"

namespace ferry::offload {

// Where each layer's FFN lies in the store: FC1 [ffn, d] and its bias [ffn], FC2 [d, ffn].
struct FfnBundleLayout {
  int d = 0, ffn = 0;
  DType dtype = DType::kF16;  // the matrices' dtype (bundles keep it); U8 with quant
  std::optional<QuantFormat> quant;  // the matrices' q4/q8 format: quantized bundles
  std::vector<std::string> up, up_bias, down;  // per layer tensor names
};

struct FfnBundleOptions {
  bool on_disk = false;         // ffn_bundles.bin instead of pinned memory
  double cache_fraction = 0.0;  // per layer, this fraction of the bundles cached on the device
  io::UringOptions uring;
};

class FfnBundles {
 public:
  static absl::StatusOr<std::unique_ptr<FfnBundles>> Create(kernels::Backend* backend, const io::Store& store,
                                                             const FfnBundleLayout& layout, const FfnBundleOptions& options);
  // Bytes of one bundle, of one layer's bundles on disk (4 KiB-aligned), and the rows of the
  // device cache per layer: what a memory plan counts.
  // With quant: the quantized bundle (0 when its group does not divide d).
  static uint64_t BundleBytes(int d, DType dtype, const std::optional<QuantFormat>& quant = std::nullopt);
  static uint64_t LayerStride(int d, int ffn, DType dtype, const std::optional<QuantFormat>& quant = std::nullopt);
  static int64_t CacheRows(int ffn, double fraction);
  // Device memory and pinned memory these bundles take (quantized: also the fp16 copy of one
  // layer's bundles the GPU's GEMM path dequantizes into).
  static uint64_t DeviceBytes(int layers, int d, int ffn, DType dtype, double cache_fraction,
                              const std::optional<QuantFormat>& quant = std::nullopt);
  static uint64_t HostBytes(int layers, int d, int ffn, DType dtype, bool on_disk, const std::optional<QuantFormat>& quant = std::nullopt);

  // The bundles of `neurons` (distinct, increasing) of `layer`, in device memory: [m, stride] in
  // the matrices' dtype (quantized: [m, bundle bytes] U8 with quant set), valid until the next Gather. Rows are the misses, then the cache hits.
  absl::StatusOr<TensorView> Gather(int layer, const std::vector<int32_t>& neurons);

  uint64_t bundle_bytes() const { return bundle_bytes_; }
  uint64_t bytes_moved() const { return bytes_moved_; }          // to the backend so far
  uint64_t disk_bytes_read() const { return disk_bytes_read_; }  // bundle pages from the SSD (page-rounded)
  int64_t cache_rows() const { return cache_rows_; }
  uint64_t cache_hits() const { return cache_hits_; }
  uint64_t cache_misses() const { return cache_misses_; }

 private:
  FfnBundles() = default;
  absl::Status BuildLayer(const io::Store& store, int layer, char* dst) const;
  absl::Status BuildQuantizedLayer(const io::Store& store, int layer, char* dst) const;
  absl::Status ReadPages(int layer, const std::vector<int32_t>& neurons);

  kernels::Backend* backend_ = nullptr;
  FfnBundleLayout layout_;
  int64_t stride_ = 0;  // elements per bundle row (2d + 1, padded to 16 bytes; quantized: bytes)
  uint64_t bundle_bytes_ = 0, layer_stride_ = 0;
  std::vector<kernels::DeviceBuffer> pinned_;  // CPU tier: per layer [ffn, stride]
  kernels::DeviceBuffer gather_;               // backend memory for one layer's fetched bundles
  // Disk tier: the bundles in ffn_bundles.bin, read page-wise into a pinned staging mirror of one
  // layer's region.
  io::ReadFile file_;
  kernels::DeviceBuffer staging_;
  std::unique_ptr<io::UringReader> reader_;
  std::unique_ptr<kernels::Fence> staging_fence_;
  // Per layer: cache_rows_ bundles in device memory, which neuron each slot holds (-1: none), the
  // slot of each neuron (-1: not cached), and the call that last used each slot.
  struct Cache {
    kernels::DeviceBuffer rows;
    std::vector<int32_t> neuron_of, slot_of;
    std::vector<uint64_t> last_used;
    // Gives `neurons` (not cached) the least recently used slots not used at `now`, as many as
    // there are; returns the slots, in the order of the neurons that got them.
    std::vector<int32_t> Admit(const std::vector<int32_t>& neurons, uint64_t now);
  };
  int64_t cache_rows_ = 0;
  std::vector<Cache> caches_;
  uint64_t clock_ = 0, cache_hits_ = 0, cache_misses_ = 0;
  uint64_t bytes_moved_ = 0, disk_bytes_read_ = 0;
};

}  // namespace ferry::offload
