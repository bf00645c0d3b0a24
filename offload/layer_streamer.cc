#include "offload/layer_streamer.h"

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::offload {
namespace {

double Since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

void Add(std::atomic<double>& a, double v) {
  double cur = a.load();
  while (!a.compare_exchange_weak(cur, cur + v)) {
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<LayerStreamer>> LayerStreamer::Create(kernels::Backend* backend, const io::Store& store,
                                                                      const Plan& plan, const StreamerOptions& options) {
  std::unique_ptr<LayerStreamer> s(new LayerStreamer());
  s->backend_ = backend;
  s->plan_ = plan;
  const auto& layers = store.layers();
  if (layers.size() != plan.layers.size()) return absl::InvalidArgumentError("plan and store disagree on the layer count");
  FERRY_ASSIGN_OR_RETURN(io::ReadFile plain, io::ReadFile::Open(store.data_path(), /*want_direct=*/false));
  uint64_t max_streamed = 0, max_disk = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerPlacement& p = plan.layers[l];
    if (layers[l].index != static_cast<int>(l) || p.begin + p.bytes > layers[l].bytes) {
      return absl::InvalidArgumentError(absl::StrCat("plan does not match the store at layer ", l));
    }
    s->layer_offsets_.push_back(layers[l].offset + p.begin);
    // The placed bytes once, checked tensor by tensor; the GPU and CPU parts come from this read.
    std::vector<char> host(p.bytes);
    FERRY_RETURN_IF_ERROR(PreadFull(plain.fd.get(), host.data(), host.size(), s->layer_offsets_[l], store.data_path()));
    for (const std::string& name : store.Names()) {  // by byte range, whatever layer the manifest names
      const io::StoreTensor* t = store.FindTensor(name);
      const uint64_t at = t->info.offset - s->layer_offsets_[l];
      if (t->info.offset < s->layer_offsets_[l] || at + t->info.bytes > p.bytes) continue;  // outside the placed range
      if (io::StoreHash(host.data() + at, t->info.bytes) != t->xxh3) {
        return absl::DataLossError(absl::StrCat(store.dir(), ": corrupt store: checksum mismatch in tensor \"", t->info.name, "\""));
      }
    }
    s->disk_digest_.push_back(io::StoreHash(host.data() + p.cpu_end, p.disk_bytes()));
    kernels::DeviceBuffer resident, pinned;
    if (p.gpu_end > 0) {
      FERRY_ASSIGN_OR_RETURN(resident, backend->Allocate(p.gpu_end));
      FERRY_RETURN_IF_ERROR(backend->CopyToDevice(resident.data(), host.data(), p.gpu_end));
    }
    if (p.cpu_bytes() > 0) {
      FERRY_ASSIGN_OR_RETURN(pinned, backend->AllocateHost(p.cpu_bytes()));
      std::memcpy(pinned.data(), host.data() + p.gpu_end, p.cpu_bytes());
    }
    s->resident_.push_back(std::move(resident));
    s->pinned_.push_back(std::move(pinned));
    if (p.streamed()) {
      s->streamed_.push_back(static_cast<int>(l));
      max_streamed = std::max(max_streamed, p.bytes);
      max_disk = std::max(max_disk, p.disk_bytes());
    }
  }
  if (s->streamed_.empty()) return s;
  for (auto& slot : s->working_) {
    FERRY_ASSIGN_OR_RETURN(slot, backend->Allocate(max_streamed));
  }
  if (max_disk > 0) {
    io::UringOptions uo = options.uring;
    for (auto& slot : s->staging_) {
      FERRY_ASSIGN_OR_RETURN(slot, backend->AllocateHost(max_disk));
      uo.registered.push_back({slot.data(), slot.bytes()});
    }
    FERRY_ASSIGN_OR_RETURN(s->file_, io::ReadFile::Open(store.data_path(), /*want_direct=*/true));
    auto reader = io::UringReader::Create(uo);
    if (!reader.ok() && !uo.registered.empty()) {  // e.g. RLIMIT_MEMLOCK: read without registering
      uo.registered.clear();
      reader = io::UringReader::Create(uo);
    }
    if (!reader.ok()) return reader.status();
    s->reader_ = std::move(*reader);
    s->disk_thread_ = std::thread([p = s.get()] { p->DiskLoop(); });
  }
  s->copy_thread_ = std::thread([p = s.get()] { p->CopyLoop(); });
  return s;
}

LayerStreamer::~LayerStreamer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (disk_thread_.joinable()) disk_thread_.join();
  if (copy_thread_.joinable()) copy_thread_.join();
}

void LayerStreamer::Fail(absl::Status s) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_.ok()) error_ = std::move(s);
  stop_ = true;
  cv_.notify_all();
}

void LayerStreamer::DiskLoop() {
  for (int64_t seq = 0;; ++seq) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || copy_done_ >= seq - 2; });  // staging slot seq%2 is free
      if (stop_) return;
    }
    const int layer = LayerOf(seq);
    const LayerPlacement& p = plan_.layers[layer];
    if (p.disk_bytes() > 0) {
      const auto t0 = std::chrono::steady_clock::now();
      const absl::Status st = reader_->Read(file_, layer_offsets_[layer] + p.cpu_end, staging_[seq % 2].data(), p.disk_bytes());
      if (!st.ok()) {
        Fail(absl::Status(st.code(), absl::StrCat("reading layer ", layer, " from disk: ", st.message())));
        return;
      }
      if (io::StoreHash(staging_[seq % 2].data(), p.disk_bytes()) != disk_digest_[layer]) {
        Fail(absl::DataLossError(absl::StrCat("layer ", layer, "'s bytes on disk changed since the store was checked (checksum mismatch)")));
        return;
      }
      Add(disk_seconds_, Since(t0));
      disk_bytes_ += p.disk_bytes();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      disk_done_ = seq;
    }
    cv_.notify_all();
  }
}

void LayerStreamer::CopyLoop() {
  for (int64_t seq = 0;; ++seq) {
    std::unique_ptr<kernels::Fence> fence;
    const int layer = LayerOf(seq);
    const LayerPlacement& p = plan_.layers[layer];
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || released_ >= seq - 2; });  // working slot seq%2 is released
      if (stop_) return;
      fence = std::move(fences_[seq % 2]);
    }
    if (fence != nullptr) {
      const absl::Status st = fence->Wait();  // the compute that read the slot has finished
      if (!st.ok()) {
        Fail(st);
        return;
      }
    }
    const auto t0 = std::chrono::steady_clock::now();
    char* slot = static_cast<char*>(working_[seq % 2].data());
    absl::Status st;
    if (p.gpu_end > 0) {
      st = backend_->TransferWithinDevice(slot, resident_[layer].data(), p.gpu_end);
      d2d_bytes_ += p.gpu_end;
    }
    if (st.ok() && p.cpu_bytes() > 0) {
      st = backend_->TransferToDevice(slot + p.gpu_end, pinned_[layer].data(), p.cpu_bytes());
      h2d_bytes_ += p.cpu_bytes();
    }
    if (st.ok() && p.disk_bytes() > 0) {
      Add(copy_seconds_, Since(t0));
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || disk_done_ >= seq; });
        if (stop_) return;
      }
      const auto t1 = std::chrono::steady_clock::now();
      st = backend_->TransferToDevice(slot + p.cpu_end, staging_[seq % 2].data(), p.disk_bytes());
      h2d_bytes_ += p.disk_bytes();
      Add(copy_seconds_, Since(t1));
    } else {
      Add(copy_seconds_, Since(t0));
    }
    if (!st.ok()) {
      Fail(st);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      copy_done_ = seq;
    }
    cv_.notify_all();
  }
}

absl::StatusOr<const char*> LayerStreamer::Acquire(int layer) {
  if (layer < 0 || layer >= num_layers()) return absl::InvalidArgumentError(absl::StrCat("no layer ", layer));
  const LayerPlacement& p = plan_.layers[layer];
  if (!p.streamed()) return static_cast<const char*>(resident_[layer].data());
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  if (acquired_ != released_) return absl::FailedPreconditionError("Acquire before the previous layer was released");
  const int64_t seq = acquired_ + 1;
  if (LayerOf(seq) != layer) {
    return absl::FailedPreconditionError(absl::StrCat("layers must be acquired in order: expected ", LayerOf(seq), ", got ", layer));
  }
  cv_.wait(lock, [&] { return !error_.ok() || copy_done_ >= seq; });
  if (!error_.ok()) return error_;
  acquired_ = seq;
  Add(wait_seconds_, Since(t0));
  return static_cast<const char*>(working_[seq % 2].data());
}

absl::Status LayerStreamer::Release(int layer, std::unique_ptr<kernels::Fence> fence) {
  if (!plan_.layers[layer].streamed()) return absl::OkStatus();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (acquired_ == released_ || LayerOf(acquired_) != layer) {
      return absl::FailedPreconditionError(absl::StrCat("release of layer ", layer, " that is not acquired"));
    }
    fences_[acquired_ % 2] = std::move(fence);
    released_ = acquired_;
  }
  cv_.notify_all();
  return absl::OkStatus();
}

StreamStats LayerStreamer::stats() const {
  StreamStats s;
  s.disk_bytes = disk_bytes_.load();
  s.h2d_bytes = h2d_bytes_.load();
  s.d2d_bytes = d2d_bytes_.load();
  s.disk_seconds = disk_seconds_.load();
  s.copy_seconds = copy_seconds_.load();
  s.acquire_wait_seconds = wait_seconds_.load();
  return s;
}

}  // namespace ferry::offload
