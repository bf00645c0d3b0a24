// The CPU backend: the numerical reference for every other backend. fp32 compute, multithreaded
// over the process thread pool, and batch invariant: each output element is computed by the
// same instruction sequence whatever else is in the batch, so a sequence's results do not
// depend on its neighbours. Memory is 64-byte aligned host memory; copies are synchronous.
#pragma once

#include <atomic>

#include "kernels/backend.h"

namespace ferry {
class ThreadPool;
}

namespace ferry::kernels {

class CpuBackend final : public Backend {
 public:
  CpuBackend();
  explicit CpuBackend(ThreadPool* pool) : pool_(pool) {}

  Device device() const override { return Device::kCpu; }
  std::string name() const override { return "cpu"; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override;
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status GatherRows(const GatherRowsArgs& args) override;
  absl::Status LayerNorm(const LayerNormArgs& args) override;
  absl::Status Linear(const LinearArgs& args) override;
  absl::Status Add(const TensorView& a, const TensorView& b, const TensorView& out) override;
  absl::Status KvWrite(const KvWriteArgs& args) override;
  absl::Status Attention(const AttentionArgs& args) override;

  size_t allocated_bytes() const { return allocated_.load(); }
  size_t peak_allocated_bytes() const { return peak_.load(); }

 protected:
  void Free(void* data, size_t bytes) override;

 private:
  ThreadPool* pool_;
  std::atomic<size_t> allocated_{0};
  std::atomic<size_t> peak_{0};
};

// The kernels themselves, usable without a backend object (benchmarks, other backends' tests).
void CpuLinear(ThreadPool& pool, const LinearArgs& args);
void CpuAttention(ThreadPool& pool, const AttentionArgs& args);

}  // namespace ferry::kernels
