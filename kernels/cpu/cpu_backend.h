// The CPU backend: the numerical reference for every other backend. fp32 compute, multithreaded
// over the process thread pool, and batch invariant: each output element is computed by the
// same instruction sequence whatever else is in the batch, so a sequence's results do not
// depend on its neighbours. Memory is 64-byte aligned host memory; copies are synchronous.
#pragma once

#include <atomic>
#include <cstddef>
#include <mutex>

#include "kernels/backend.h"

namespace ferry {
class ThreadPool;
}

namespace ferry::kernels {

struct CpuBackendOptions {
  // Budgets for the CPU standing in for a GPU: "device" allocations and host staging
  // allocations; 0 means none. Allocations past a budget are kResourceExhausted.
  size_t device_budget_bytes = 0;
  size_t host_budget_bytes = 0;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend();
  explicit CpuBackend(const CpuBackendOptions& options);
  explicit CpuBackend(ThreadPool* pool) : pool_(pool) {}

  Device device() const override { return Device::kCpu; }
  std::string name() const override { return "cpu"; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override;
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override;
  absl::Status TransferToDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status TransferWithinDevice(void* dst, const void* src, size_t bytes) override;
  // Ops run synchronously: every fence is already passed.
  absl::StatusOr<std::unique_ptr<Fence>> RecordFence() override;

  absl::Status GatherRows(const GatherRowsArgs& args) override;
  absl::Status LayerNorm(const LayerNormArgs& args) override;
  absl::Status AddLayerNorm(const AddLayerNormArgs& args) override;
  absl::Status Linear(const LinearArgs& args) override;
  absl::Status RmsNorm(const RmsNormArgs& args) override;
  absl::Status AddRmsNorm(const AddRmsNormArgs& args) override;
  absl::Status Rope(const RopeArgs& args) override;
  absl::Status SiluMul(const SiluMulArgs& args) override;
  absl::Status CopyTensor(const TensorView& src, const TensorView& dst) override;
  absl::Status Add(const TensorView& a, const TensorView& b, const TensorView& out) override;
  absl::Status KvWrite(const KvWriteArgs& args) override;
  absl::Status Attention(const AttentionArgs& args) override;
  absl::Status BundledFfn(const BundledFfnArgs& args) override;
  absl::Status ArgMaxRows(const TensorView& logits, const TensorView& ids) override;
  absl::Status SampleRows(const SampleRowsArgs& args) override;
  absl::Status SlotKvWrite(const SlotKvWriteArgs& args) override;
  absl::Status SlotAttention(const SlotAttentionArgs& args) override;
  absl::Status H2OPlace(const H2OPlaceArgs& args) override;
  absl::Status H2OUpdate(const H2OUpdateArgs& args) override;
  absl::Status H2OPrefill(const H2OPrefillArgs& args) override;
  absl::Status GatherHostRows(const void* host_table, size_t row_bytes, const std::vector<int32_t>& rows, void* dst) override;
  absl::Status CopyRows(const void* src, void* dst, size_t row_bytes, const std::vector<int32_t>& src_rows,
                        const std::vector<int32_t>& dst_rows) override;
  absl::Status MatMul(const MatMulArgs& args) override;
  absl::Status BceGrad(const BceGradArgs& args) override;
  absl::Status AdamStep(const AdamArgs& args) override;

  size_t allocated_bytes() const { return device_.allocated.load(); }
  size_t peak_allocated_bytes() const { return device_.peak.load(); }
  size_t host_allocated_bytes() const { return host_.allocated.load(); }
  size_t peak_host_allocated_bytes() const { return host_.peak.load(); }

 protected:
  void Free(void* data, size_t bytes, bool host) override;

 private:
  struct Pool {
    std::atomic<size_t> allocated{0};
    std::atomic<size_t> peak{0};
    size_t budget = 0;
  };
  absl::StatusOr<DeviceBuffer> AllocateIn(Pool& pool, size_t bytes, bool host);
  // Working memory of an op that outlives its call, grown to the largest size asked and kept:
  // BundledFfn's unbundled matrices (a prefill's are the whole FFN, megabytes per layer; allocated
  // per call, glibc returned them to the kernel and every call paid the page faults and zeroing
  // again, a third of opt-125m's sparse prefill on the dev VM).
  class Scratch {
   public:
    Scratch() = default;
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch();
    // At least `bytes`, 64-byte aligned (2 MiB and MADV_HUGEPAGE from 2 MiB); contents undefined.
    absl::StatusOr<char*> Get(size_t bytes);

   private:
    char* data_ = nullptr;
    size_t bytes_ = 0;
  };

  ThreadPool* pool_;
  Pool device_, host_;
  std::mutex ffn_mu_;  // BundledFfn's scratch: one call at a time
  Scratch ffn_scratch_;
};

// The kernels themselves, usable without a backend object (benchmarks, other backends' tests).
void CpuLinear(ThreadPool& pool, const LinearArgs& args);
void CpuAttention(ThreadPool& pool, const AttentionArgs& args);
void CpuSlotAttention(ThreadPool& pool, const SlotAttentionArgs& args);
void CpuRmsNorm(ThreadPool& pool, const RmsNormArgs& args);

}  // namespace ferry::kernels
