#include "kernels/cuda/cuda_backend.h"

#include "base/status.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

cudaDataType CudaType(DType d) {
  switch (d) {
    case DType::kF16: return CUDA_R_16F;
    case DType::kBF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

absl::Status RequireDevice(const TensorView& t, const char* what) {
  if (t.data != nullptr && t.device != Device::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", what, " is not in device memory"));
  }
  return absl::OkStatus();
}

}  // namespace

int VisibleDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error of a missing driver
    return 0;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const CudaBackendOptions& options) {
  const int count = VisibleDeviceCount();
  if (count == 0) return absl::UnavailableError("cuda backend: no CUDA device is visible");
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: device ", options.device, " does not exist (", count, " visible)"));
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->options_ = options;
  FERRY_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&b->stream_, cudaStreamNonBlocking));
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&b->transfer_stream_, cudaStreamNonBlocking));
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasCreate(&b->cublas_));
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasSetStream(b->cublas_, b->stream_));
  return b;
}

CudaBackend::~CudaBackend() {
  scratch_ = DeviceBuffer();
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  if (transfer_stream_ != nullptr) {
    cudaStreamSynchronize(transfer_stream_);
    cudaStreamDestroy(transfer_stream_);
  }
}

absl::StatusOr<DeviceBuffer> CudaBackend::Allocate(size_t bytes) {
  if (options_.memory_budget_bytes > 0 && allocated_ + bytes > options_.memory_budget_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("cuda backend: allocating ", bytes, " bytes would exceed the budget of ",
                                                     options_.memory_budget_bytes, " (", allocated_.load(), " in use)"));
  }
  void* p = nullptr;
  FERRY_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&p, bytes == 0 ? 1 : bytes, stream_));
  const size_t now = allocated_ += bytes;
  size_t peak = peak_.load();
  while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
  }
  return DeviceBuffer(this, p, bytes);
}

absl::StatusOr<DeviceBuffer> CudaBackend::AllocateHost(size_t bytes) {
  if (options_.host_budget_bytes > 0 && host_allocated_ + bytes > options_.host_budget_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("cuda backend: pinning ", bytes, " bytes would exceed the host budget of ",
                                                     options_.host_budget_bytes));
  }
  void* p = nullptr;
  FERRY_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocDefault));
  host_allocated_ += bytes;
  return DeviceBuffer(this, p, bytes, /*host=*/true);
}

void CudaBackend::Free(void* data, size_t bytes, bool host) {
  if (host) {
    cudaStreamSynchronize(transfer_stream_);
    cudaFreeHost(data);
    host_allocated_ -= bytes;
    return;
  }
  cudaFreeAsync(data, stream_);  // stream-ordered: after every queued use
  allocated_ -= bytes;
}

absl::Status CudaBackend::TransferToDevice(void* dst, const void* src, size_t bytes) {
  FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, transfer_stream_));
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(transfer_stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::TransferWithinDevice(void* dst, const void* src, size_t bytes) {
  FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, transfer_stream_));
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(transfer_stream_));
  return absl::OkStatus();
}

namespace {

class CudaFence final : public Fence {
 public:
  explicit CudaFence(cudaEvent_t e) : event_(e) {}
  ~CudaFence() override { cudaEventDestroy(event_); }
  absl::Status Wait() override {
    FERRY_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
    return absl::OkStatus();
  }

 private:
  cudaEvent_t event_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Fence>> CudaBackend::RecordFence() {
  cudaEvent_t e;
  FERRY_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  auto fence = std::make_unique<CudaFence>(e);
  FERRY_CUDA_RETURN_IF_ERROR(cudaEventRecord(e, stream_));
  return std::unique_ptr<Fence>(std::move(fence));
}

absl::Status CudaBackend::CopyToDevice(void* dst, const void* src, size_t bytes) {
  FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));  // the host buffer may go away
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyToHost(void* dst, const void* src, size_t bytes) {
  FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Synchronize() {
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::EnsureScratch(size_t bytes) {
  if (scratch_.bytes() >= bytes) return absl::OkStatus();
  scratch_ = DeviceBuffer();
  FERRY_ASSIGN_OR_RETURN(scratch_, Allocate(bytes));
  return absl::OkStatus();
}

absl::Status CudaBackend::GatherRows(const GatherRowsArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateGatherRows(a));
  FERRY_RETURN_IF_ERROR(RequireDevice(a.table, "table"));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchGatherRows(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::LayerNorm(const LayerNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateLayerNorm(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchLayerNorm(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Linear(const LinearArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateLinear(a));
  FERRY_RETURN_IF_ERROR(RequireDevice(a.weight, "weight"));
  const int64_t n = a.in.shape[0], k = a.in.shape[1], m = a.weight.shape[0];
  if (n == 0) return absl::OkStatus();
  const float alpha = 1.0f, beta = 0.0f;
  const void* b = a.in.data;
  if (a.weight.dtype != DType::kF32) {
    // GEMM inputs share one type: round the activations to the weight's 16-bit type.
    FERRY_RETURN_IF_ERROR(EnsureScratch(static_cast<size_t>(n * k) * 2));
    FERRY_CUDA_RETURN_IF_ERROR(LaunchConvertFromF32(a.in.as<const float>(), scratch_.data(), a.weight.dtype, n * k, stream_));
    b = scratch_.data();
  }
  // Row-major out[n, m] = in[n, k] W[m, k]^T is column-major out^T[m, n] = W^T(op T) x in^T.
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n),
                                            static_cast<int>(k), &alpha, a.weight.data, CudaType(a.weight.dtype),
                                            static_cast<int>(k), b, CudaType(a.weight.dtype), static_cast<int>(k), &beta,
                                            a.out.data, CUDA_R_32F, static_cast<int>(m), CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchBiasRelu(a.out.as<float>(), a.bias.data != nullptr ? a.bias.as<const float>() : nullptr,
                                            n, m, a.relu, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyTensor(const TensorView& src, const TensorView& dst) {
  FERRY_RETURN_IF_ERROR(ValidateCopy(src, dst));
  FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Add(const TensorView& a, const TensorView& b, const TensorView& out) {
  FERRY_RETURN_IF_ERROR(ValidateAdd(a, b, out));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchAdd(a.as<const float>(), b.as<const float>(), out.as<float>(), a.numel(), stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::KvWrite(const KvWriteArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateKvWrite(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchKvWrite(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Attention(const AttentionArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAttention(a));
  if (a.q.shape[1] / a.num_heads > 256) return absl::InvalidArgumentError("cuda attention: head_dim above 256");
  if (a.col_sums.data != nullptr) return absl::UnimplementedError("cuda attention: column sums (H2O prefill) not on the GPU yet");
  FERRY_CUDA_RETURN_IF_ERROR(LaunchAttention(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::BundledFfn(const BundledFfnArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateBundledFfn(a));
  return absl::UnimplementedError("cuda backend: the bundled sparse FFN is not implemented on the GPU yet");
}

absl::Status CudaBackend::ArgMaxRows(const TensorView& logits, const TensorView& ids) {
  FERRY_RETURN_IF_ERROR(ValidateArgMaxRows(logits, ids));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchArgMaxRows(logits.as<const float>(), ids.as<int32_t>(), logits.shape[0], logits.shape[1], stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::SlotKvWrite(const SlotKvWriteArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSlotKvWrite(a));
  return absl::UnimplementedError("cuda backend: H2O slot KV cache is not implemented on the GPU yet");
}

absl::Status CudaBackend::SlotAttention(const SlotAttentionArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSlotAttention(a));
  return absl::UnimplementedError("cuda backend: H2O slot attention is not implemented on the GPU yet");
}

}  // namespace ferry::kernels::cuda
