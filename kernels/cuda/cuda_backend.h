// The CUDA backend: device memory from the stream-ordered allocator (within an optional budget),
// one compute stream, cuBLAS GEMMs (fp16/bf16 weights, fp32 accumulation) and the kernels in this
// folder. Copies to and from the host complete before they return. Every CUDA and cuBLAS error
// comes back as a Status naming the call.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/lt_gemm.h"

namespace ferry::kernels::cuda {

struct CudaBackendOptions {
  int device = 0;
  size_t memory_budget_bytes = 0;  // 0: no budget beyond the card's memory
  size_t host_budget_bytes = 0;    // pinned host memory; 0: no budget
  // GEMMs of at most this many rows with 16-bit weights split the fp32 activations into two 16-bit
  // terms (hi + lo) and run as one GEMM of twice the rows: about fp32 accuracy where the GEMM is
  // bound by reading the weights (decode), where the extra rows cost next to nothing. Larger
  // GEMMs (prefill) round the activations to the weight type. 0: never split.
  int64_t split_gemm_max_rows = 128;
  // Prefill attention on the tensor cores (Q, K, V rounded to fp16, fp32 softmax and accumulation)
  // for runs of >= 16 queries of one sequence at consecutive positions, when the caller passes
  // host copies of seq_ids/positions; otherwise (and for decode) the fp32 per-query kernel.
  bool prefill_tensor_cores = true;
  // GEMMs above split_gemm_max_rows with 16-bit weights run through cuBLASLt with the bias and
  // ReLU in its epilogue (the output written once); false: cublasGemmEx, then a bias/ReLU pass.
  // Shapes cuBLASLt has no algorithm for take the second way either way.
  bool gemm_epilogue = true;
  // cuBLAS's and cuBLASLt's GEMM workspace, allocated at creation inside the memory budget (32 MiB
  // is NVIDIA's recommendation for Hopper); capped at 1/16 of a budget, rounded down to 4 KiB.
  size_t gemm_workspace_bytes = size_t{32} << 20;
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

  size_t reserved_device_bytes() const override { return workspace_.bytes(); }

  cudaStream_t stream() const { return stream_; }
  // GEMMs that ran through cuBLASLt's epilogue, and those it had no algorithm for (which fell back).
  int64_t lt_gemm_calls() const { return lt_.calls(); }
  int64_t lt_gemm_fallbacks() const { return lt_.unsupported(); }
  void set_gemm_epilogue(bool on) { options_.gemm_epilogue = on; }
  size_t allocated_bytes() const { return allocated_; }
  size_t peak_allocated_bytes() const { return peak_; }

 protected:
  void Free(void* data, size_t bytes, bool host) override;

 private:
  CudaBackend() = default;
  absl::Status EnsureScratch(size_t bytes);
  absl::Status EnsureBundleScratch(size_t bytes);
  // GatherHostRows and CopyRows: dst row dst_rows[i] (i without dst_rows) = src row src_rows[i].
  absl::Status MoveRows(const void* src, void* dst, size_t row_bytes, const std::vector<int32_t>& src_rows,
                        const std::vector<int32_t>* dst_rows);
  // out[n, m] (+ bias, ReLU) = x[n, k] with W, fp32 accumulation. W is [m, k] row-major with row
  // stride ld (mk: out = x W^T) or [k, m] (out = x W); 16-bit W takes x split (hi + lo) up to
  // split_gemm_max_rows rows, else rounded to W's type.
  struct GemmOperand {
    const float* data;
    int64_t rows, cols;
  };
  struct WeightOperand {
    const void* data;
    DType dtype;
    int64_t ld;
    bool mk;
  };
  absl::Status Gemm(const GemmOperand& x, const WeightOperand& w, int64_t m, float* out, const float* bias, bool relu);

  CudaBackendOptions options_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t transfer_stream_ = nullptr;  // used by the transfer thread only
  cublasHandle_t cublas_ = nullptr;
  LtGemm lt_;
  DeviceBuffer workspace_;       // cuBLAS's and cuBLASLt's workspace
  DeviceBuffer dequant_;         // a quantized matrix as fp16 for the GEMM path (batches above kFusedQuantRows)
  std::atomic<size_t> allocated_{0}, peak_{0}, host_allocated_{0};
  DeviceBuffer scratch_;         // activations converted for GEMM
  DeviceBuffer bundle_scratch_;  // BundledFfn's [n, m] activations
  DeviceBuffer gather_ids_;      // GatherHostRows' row ids
  DeviceBuffer sample_scratch_;  // SampleRows' sort buffers and uniforms
  // Launch plans of the tensor-core prefill (tiles, then the other queries), cached by the host
  // seq_ids/positions they were made from: a forward's layers (and its micro-batches) reuse them.
  struct AttentionPlan {
    std::vector<int32_t> key;  // seq_ids then positions
    DeviceBuffer dev;          // int2 tiles[num_tiles], then int32 rows[num_rows]
    int64_t num_tiles = 0, num_rows = 0;
  };
  std::vector<AttentionPlan> plans_ = std::vector<AttentionPlan>(16);  // >= the GPU batches of a step
  size_t next_plan_ = 0;
  absl::StatusOr<const AttentionPlan*> PlanAttention(const AttentionArgs& a);
};

}  // namespace ferry::kernels::cuda
