// The CUDA backend: device memory from the stream-ordered allocator (within an optional budget),
// one compute stream, cuBLAS GEMMs (fp16/bf16 weights, fp32 accumulation) and the kernels in this
// folder. Copies to and from the host complete before they return. Every CUDA and cuBLAS error
// comes back as a Status naming the call.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <memory>

#include "kernels/backend.h"

namespace ferry::kernels::cuda {

struct CudaBackendOptions {
  int device = 0;
  size_t memory_budget_bytes = 0;  // 0: no budget beyond the card's memory
  size_t host_budget_bytes = 0;    // pinned host memory; 0: no budget
};

// Number of visible CUDA devices (0 where there is no driver or no GPU).
int VisibleDeviceCount();

class CudaBackend final : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const CudaBackendOptions& options = {});
  ~CudaBackend() override;

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return "cuda"; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override;
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override;
  absl::Status Synchronize() override;
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override;
  absl::Status TransferToDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status TransferWithinDevice(void* dst, const void* src, size_t bytes) override;
  absl::StatusOr<std::unique_ptr<Fence>> RecordFence() override;

  absl::Status GatherRows(const GatherRowsArgs& args) override;
  absl::Status LayerNorm(const LayerNormArgs& args) override;
  absl::Status Linear(const LinearArgs& args) override;
  absl::Status CopyTensor(const TensorView& src, const TensorView& dst) override;
  absl::Status Add(const TensorView& a, const TensorView& b, const TensorView& out) override;
  absl::Status KvWrite(const KvWriteArgs& args) override;
  absl::Status Attention(const AttentionArgs& args) override;
  // H2O's slot cache: not on the GPU yet (kUnimplemented).
  absl::Status BundledFfn(const BundledFfnArgs& args) override;
  absl::Status ArgMaxRows(const TensorView& logits, const TensorView& ids) override;
  absl::Status SlotKvWrite(const SlotKvWriteArgs& args) override;
  absl::Status SlotAttention(const SlotAttentionArgs& args) override;

  cudaStream_t stream() const { return stream_; }
  size_t allocated_bytes() const { return allocated_; }
  size_t peak_allocated_bytes() const { return peak_; }

 protected:
  void Free(void* data, size_t bytes, bool host) override;

 private:
  CudaBackend() = default;
  absl::Status EnsureScratch(size_t bytes);

  CudaBackendOptions options_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t transfer_stream_ = nullptr;  // used by the transfer thread only
  cublasHandle_t cublas_ = nullptr;
  std::atomic<size_t> allocated_{0}, peak_{0}, host_allocated_{0};
  DeviceBuffer scratch_;  // activations converted for GEMM
};

}  // namespace ferry::kernels::cuda
