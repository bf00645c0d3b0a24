// Streams decoder-layer weight blocks through device memory at link speed, per a Plan:
//   disk thread:  O_DIRECT io_uring read of layer j's disk part into pinned staging slot j%2
//   copy thread:  resident prefix (device->device), CPU part and staged disk part (host->device)
//                 into device working slot j%2, once the compute that last used the slot passed
//                 its fence
//   compute:      Acquire(j) waits for slot j%2, runs the layer, Release(j, fence)
// so the read of layer j+2, the copy of layer j+1 and the compute of layer j overlap and nothing
// waits on a global synchronization. Layers are consumed cyclically (0..L-1, then 0 again for the
// next forward pass). Layers that are fully resident never enter the pipeline.
// Nothing from the store is used unchecked: Create reads each layer's placed bytes once and checks
// every tensor in them against the manifest's XXH3 (a mismatch refuses the store, kDataLoss) and
// records the XXH3 of the disk part, which the disk thread recomputes after every read (at several
// GB/s, off the compute path) so that a disk part changed since is an error, never a weight.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "io/store.h"
#include "io/uring_reader.h"
#include "kernels/backend.h"
#include "offload/policy.h"

namespace ferry::offload {

struct StreamerOptions {
  io::UringOptions uring;  // queue depth, block size, fault hook (registered buffers are set here)
};

struct StreamStats {
  uint64_t disk_bytes = 0;  // disk -> pinned
  uint64_t h2d_bytes = 0;   // pinned -> device
  uint64_t d2d_bytes = 0;   // resident prefix -> working slot
  double disk_seconds = 0, copy_seconds = 0;  // busy time of each stage
  double acquire_wait_seconds = 0;            // compute waiting for weights
};

class LayerStreamer {
 public:
  // Loads the resident and CPU parts of every layer from the store and starts the pipeline.
  static absl::StatusOr<std::unique_ptr<LayerStreamer>> Create(kernels::Backend* backend, const io::Store& store,
                                                                const Plan& plan, const StreamerOptions& options);
  ~LayerStreamer();

  // Device address of layer `layer`'s block, once it is there. Layers must be acquired in
  // cyclic order, each released before the next is acquired.
  absl::StatusOr<const char*> Acquire(int layer);
  // The compute that reads the layer was queued before `fence`.
  absl::Status Release(int layer, std::unique_ptr<kernels::Fence> fence);

  StreamStats stats() const;
  int num_layers() const { return static_cast<int>(plan_.layers.size()); }

 private:
  LayerStreamer() = default;
  void DiskLoop();
  void CopyLoop();
  void Fail(absl::Status s);  // records the first error and stops the pipeline
  int LayerOf(int64_t seq) const { return streamed_[seq % static_cast<int64_t>(streamed_.size())]; }

  kernels::Backend* backend_ = nullptr;
  Plan plan_;
  std::vector<uint64_t> layer_offsets_;          // in weights.bin
  std::vector<uint64_t> disk_digest_;            // per layer, XXH3 of [cpu_end, bytes)
  std::vector<kernels::DeviceBuffer> resident_;  // per layer, [0, gpu_end)
  std::vector<kernels::DeviceBuffer> pinned_;    // per layer, [gpu_end, cpu_end)
  std::vector<int> streamed_;                    // layers that go through the slots, in order
  kernels::DeviceBuffer working_[2], staging_[2];
  io::ReadFile file_;
  std::unique_ptr<io::UringReader> reader_;

  std::mutex mu_;
  std::condition_variable cv_;
  int64_t disk_done_ = -1, copy_done_ = -1, released_ = -1, acquired_ = -1;
  std::unique_ptr<kernels::Fence> fences_[2];
  bool stop_ = false;
  absl::Status error_;
  std::atomic<uint64_t> disk_bytes_{0}, h2d_bytes_{0}, d2d_bytes_{0};
  std::atomic<double> disk_seconds_{0}, copy_seconds_{0}, wait_seconds_{0};
  std::thread disk_thread_, copy_thread_;
};

}  // namespace ferry::offload
