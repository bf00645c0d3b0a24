#include "kernels/cuda/cuda_backend.h"

#include <algorithm>

#include "base/status.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

// The attention kernels read F32, F16 and q8/q4 caches with power-of-two groups (every group
// ParseKvType picks); other groups run on the CPU backend.
absl::Status RequireKvType(const TensorView& cache) {
  if (KvTypeSupported(cache)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("cuda backend: a ", KvTypeName(cache.quant ? KvType(*cache.quant) : KvType(cache.dtype)),
                                                 " KV cache needs a power-of-two group on the GPU"));
}

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
  FERRY_RETURN_IF_ERROR(b->lt_.Init());
  size_t ws = options.gemm_workspace_bytes;
  if (options.memory_budget_bytes > 0) ws = std::min(ws, options.memory_budget_bytes / 16);
  ws = ws / 4096 * 4096;
  if (ws > 0) {
    FERRY_ASSIGN_OR_RETURN(b->workspace_, b->Allocate(ws));
    // After cublasSetStream, which resets the workspace to cuBLAS's own pool.
    FERRY_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(b->cublas_, b->workspace_.data(), ws));
    b->lt_.SetWorkspace(b->workspace_.data(), ws);
  }
  return b;
}

CudaBackend::~CudaBackend() {
  scratch_ = DeviceBuffer();  // freed on stream_, before it goes
  bundle_scratch_ = DeviceBuffer();
  gather_ids_ = DeviceBuffer();
  sample_scratch_ = DeviceBuffer();
  workspace_ = DeviceBuffer();
  dequant_ = DeviceBuffer();
  plans_.clear();
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

absl::Status CudaBackend::RmsNorm(const RmsNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateRmsNorm(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchRmsNorm(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AddRmsNorm(const AddRmsNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAddRmsNorm(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchAddRmsNorm(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Rope(const RopeArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateRope(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchRope(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::SiluMul(const SiluMulArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSiluMul(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchSiluMul(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Gemm(const GemmOperand& x, const WeightOperand& w, int64_t m, float* out, const float* bias,
                                bool relu) {
  const int64_t n = x.rows, k = x.cols;
  if (n == 0 || m == 0) return absl::OkStatus();
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType wtype = CudaType(w.dtype);
  // Row-major out[n, m] = x[n, k] W^T (W stored [m, k]) or x[n, k] W (W stored [k, m]); cuBLAS is
  // column-major, so this is out^T[m, n] = op(W) x^T.
  const cublasOperation_t op = w.mk ? CUBLAS_OP_T : CUBLAS_OP_N;
  auto gemm = [&](const void* in, int64_t rows, void* dst) -> absl::Status {
    FERRY_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas_, op, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(rows),
                                              static_cast<int>(k), &alpha, w.data, wtype, static_cast<int>(w.ld), in, wtype,
                                              static_cast<int>(k), &beta, dst, CUDA_R_32F, static_cast<int>(m),
                                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  };
  if (w.dtype == DType::kF32) {
    FERRY_RETURN_IF_ERROR(gemm(x.data, n, out));
  } else if (n <= options_.split_gemm_max_rows) {
    // hi + lo / scale: scale 2^11 (fp16) or 2^8 (bf16) lifts lo to hi's magnitude.
    const float scale = w.dtype == DType::kF16 ? 2048.0f : 256.0f;
    const size_t in_bytes = static_cast<size_t>(2 * n * k) * 2, in_padded = (in_bytes + 255) / 256 * 256;
    FERRY_RETURN_IF_ERROR(EnsureScratch(in_padded + static_cast<size_t>(2 * n * m) * sizeof(float)));
    char* split = static_cast<char*>(scratch_.data());
    float* tmp = reinterpret_cast<float*>(split + in_padded);
    FERRY_CUDA_RETURN_IF_ERROR(LaunchSplitFromF32(x.data, split, w.dtype, n * k, scale, stream_));
    FERRY_RETURN_IF_ERROR(gemm(split, 2 * n, tmp));
    FERRY_CUDA_RETURN_IF_ERROR(LaunchCombineSplit(tmp, out, bias, n, m, 1.0f / scale, relu, stream_));
    return absl::OkStatus();
  } else {
    // GEMM inputs share one type: round the activations to the weight's 16-bit type.
    FERRY_RETURN_IF_ERROR(EnsureScratch(static_cast<size_t>(n * k) * 2));
    FERRY_CUDA_RETURN_IF_ERROR(LaunchConvertFromF32(x.data, scratch_.data(), w.dtype, n * k, stream_));
    if (options_.gemm_epilogue) {
      FERRY_ASSIGN_OR_RETURN(const bool done, lt_.Run({w.data, w.mk, w.ld, scratch_.data(), wtype, m, n, k, out, bias, relu}, stream_));
      if (done) return absl::OkStatus();
    }
    FERRY_RETURN_IF_ERROR(gemm(scratch_.data(), n, out));
  }
  FERRY_CUDA_RETURN_IF_ERROR(LaunchBiasRelu(out, bias, n, m, relu, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AddLayerNorm(const AddLayerNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAddLayerNorm(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchAddLayerNorm(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::Linear(const LinearArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateLinear(a));
  if (a.weight.quant) {
    FERRY_RETURN_IF_ERROR(RequireDevice(a.weight, "weight"));
    FERRY_ASSIGN_OR_RETURN(const QuantLayout layout, LayoutQuantized(*a.weight.quant, a.weight.shape[0], a.weight.shape[1]));
    const int64_t n = a.in.shape[0], k = a.in.shape[1], m = a.weight.shape[0];
    if (n <= kFusedQuantRows) {  // small batches: read the packed weights once, in the fused kernel
      FERRY_CUDA_RETURN_IF_ERROR(LaunchQuantLinear(a, layout, stream_));
      return absl::OkStatus();
    }
    // Larger batches: dequantize into fp16 in device memory (HBM-fast) and run the fp16 GEMM.
    const size_t bytes = static_cast<size_t>(m * k) * 2;
    if (dequant_.bytes() < bytes) {
      dequant_ = DeviceBuffer();
      FERRY_ASSIGN_OR_RETURN(dequant_, Allocate(bytes));
    }
    FERRY_CUDA_RETURN_IF_ERROR(LaunchDequantizeToF16(a.weight, layout, dequant_.data(), stream_));
    return Gemm({a.in.as<const float>(), n, k}, {dequant_.data(), DType::kF16, k, true}, m, a.out.as<float>(),
                a.bias.data != nullptr ? a.bias.as<const float>() : nullptr, a.relu);
  }
  FERRY_RETURN_IF_ERROR(RequireDevice(a.weight, "weight"));
  const int64_t n = a.in.shape[0], k = a.in.shape[1], m = a.weight.shape[0];
  return Gemm({a.in.as<const float>(), n, k}, {a.weight.data, a.weight.dtype, k, true}, m, a.out.as<float>(),
              a.bias.data != nullptr ? a.bias.as<const float>() : nullptr, a.relu);
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
  FERRY_RETURN_IF_ERROR(RequireKvType(a.k_cache));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchKvWrite(a, stream_));
  return absl::OkStatus();
}

absl::StatusOr<const CudaBackend::AttentionPlan*> CudaBackend::PlanAttention(const AttentionArgs& a) {
  const int64_t n = a.q.shape[0];
  std::vector<int32_t> key(a.host_seq_ids, a.host_seq_ids + n);
  key.insert(key.end(), a.host_positions, a.host_positions + n);
  for (const AttentionPlan& p : plans_) {
    if (p.key == key) return &p;
  }
  constexpr int64_t kMinTileRows = 16, kMaxTileRows = 64;
  std::vector<int32_t> tiles, rows;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && j - i < kMaxTileRows && a.host_seq_ids[j] == a.host_seq_ids[i] &&
           a.host_positions[j] == a.host_positions[j - 1] + 1) {
      ++j;
    }
    if (j - i >= kMinTileRows) {
      tiles.push_back(static_cast<int32_t>(i));
      tiles.push_back(static_cast<int32_t>(j - i));
    } else {
      for (int64_t r = i; r < j; ++r) rows.push_back(static_cast<int32_t>(r));
    }
    i = j;
  }
  if (tiles.empty()) {  // decode-like calls: nothing to upload, nothing to cache, no sync
    static const AttentionPlan kNone;
    return &kNone;
  }
  AttentionPlan& p = plans_[next_plan_];
  next_plan_ = (next_plan_ + 1) % plans_.size();
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));  // queued kernels may still read p.dev
  p.key = std::move(key);
  p.num_tiles = static_cast<int64_t>(tiles.size()) / 2;
  p.num_rows = static_cast<int64_t>(rows.size());
  tiles.insert(tiles.end(), rows.begin(), rows.end());
  const size_t bytes = tiles.size() * sizeof(int32_t);
  if (p.dev.bytes() < bytes) {
    p.dev = DeviceBuffer();
    FERRY_ASSIGN_OR_RETURN(p.dev, Allocate(bytes));
  }
  if (bytes > 0) FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpy(p.dev.data(), tiles.data(), bytes, cudaMemcpyHostToDevice));
  return &p;
}

absl::Status CudaBackend::Attention(const AttentionArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAttention(a));
  FERRY_RETURN_IF_ERROR(RequireKvType(a.k_cache));
  const int64_t n = a.q.shape[0];
  const int head_dim = static_cast<int>(a.q.shape[1] / a.num_heads);
  if (head_dim > 256) return absl::InvalidArgumentError("cuda attention: head_dim above 256");
  if (a.host_seq_ids != nullptr && a.host_positions != nullptr &&
      options_.prefill_tensor_cores && PrefillTilesSupported(head_dim) && n >= 16) {
    FERRY_ASSIGN_OR_RETURN(const AttentionPlan* plan, PlanAttention(a));
    if (plan->num_tiles > 0) {
      const int2* tiles = static_cast<const int2*>(plan->dev.data());
      FERRY_CUDA_RETURN_IF_ERROR(LaunchPrefillTiles(a, tiles, plan->num_tiles, stream_));
      FERRY_CUDA_RETURN_IF_ERROR(
          LaunchAttention(a, reinterpret_cast<const int32_t*>(tiles + plan->num_tiles), plan->num_rows, stream_));
      return absl::OkStatus();
    }
  }
  FERRY_CUDA_RETURN_IF_ERROR(LaunchAttention(a, nullptr, n, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::BundledFfn(const BundledFfnArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateBundledFfn(a));
  FERRY_RETURN_IF_ERROR(RequireDevice(a.bundles, "bundles"));
  const int64_t n = a.x.shape[0], d = a.x.shape[1], m = a.bundles.shape[0], width = a.bundles.shape[1];  // row stride
  if (n == 0) return absl::OkStatus();
  if (m == 0) {  // no neuron selected: out = FC2 bias
    FERRY_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.out.data, 0, a.out.bytes(), stream_));
    FERRY_CUDA_RETURN_IF_ERROR(LaunchBiasRelu(a.out.as<float>(), a.fc2_bias.data != nullptr ? a.fc2_bias.as<const float>() : nullptr,
                                              n, d, false, stream_));
    return absl::OkStatus();
  }
  // act[n, m] = relu(x . FC1 rows + FC1 bias): the rows are the bundles' first d values (row
  // stride 2d + 1); then out[n, d] = act . FC2 columns (the last d values) + FC2 bias.
  const size_t act_bytes = (static_cast<size_t>(n * m) * sizeof(float) + 255) / 256 * 256;
  if (a.bundles.quant) {
    // Quantized bundles: dequantized into fp16 [m, 2d] (FC1 row | FC2 column) beside the
    // activations, then the same two GEMMs; FC1's bias is read in fp32 from the bundles.
    auto layout = LayoutQuantBundle(*a.bundles.quant, d);
    if (!layout.ok()) return layout.status();
    FERRY_RETURN_IF_ERROR(EnsureBundleScratch(act_bytes + static_cast<size_t>(m * 2 * d) * 2));
    float* act = static_cast<float*>(bundle_scratch_.data());
    char* dense = static_cast<char*>(bundle_scratch_.data()) + act_bytes;
    FERRY_CUDA_RETURN_IF_ERROR(LaunchDequantizeBundles(a.bundles, *layout, d, dense, stream_));
    FERRY_RETURN_IF_ERROR(Gemm({a.x.as<const float>(), n, d}, {dense, DType::kF16, 2 * d, true}, m, act, nullptr, false));
    FERRY_CUDA_RETURN_IF_ERROR(LaunchStridedBiasRelu(act, a.bundles.as<const char>() + layout->bias_offset, DType::kF32,
                                                     width / static_cast<int64_t>(sizeof(float)), n, m, stream_));
    return Gemm({act, n, m}, {dense + d * 2, DType::kF16, 2 * d, false}, d, a.out.as<float>(),
                a.fc2_bias.data != nullptr ? a.fc2_bias.as<const float>() : nullptr, false);
  }
  FERRY_RETURN_IF_ERROR(EnsureBundleScratch(act_bytes));
  float* act = static_cast<float*>(bundle_scratch_.data());
  const size_t esize = DTypeSize(a.bundles.dtype);
  const char* base = a.bundles.as<const char>();
  FERRY_RETURN_IF_ERROR(Gemm({a.x.as<const float>(), n, d}, {base, a.bundles.dtype, width, true}, m, act, nullptr, false));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchStridedBiasRelu(act, base + d * esize, a.bundles.dtype, width, n, m, stream_));
  return Gemm({act, n, m}, {base + (d + 1) * esize, a.bundles.dtype, width, false}, d, a.out.as<float>(),
              a.fc2_bias.data != nullptr ? a.fc2_bias.as<const float>() : nullptr, false);
}

absl::Status CudaBackend::EnsureBundleScratch(size_t bytes) {
  if (bundle_scratch_.bytes() >= bytes) return absl::OkStatus();
  bundle_scratch_ = DeviceBuffer();
  FERRY_ASSIGN_OR_RETURN(bundle_scratch_, Allocate(bytes));
  return absl::OkStatus();
}

absl::Status CudaBackend::ArgMaxRows(const TensorView& logits, const TensorView& ids) {
  FERRY_RETURN_IF_ERROR(ValidateArgMaxRows(logits, ids));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchArgMaxRows(logits.as<const float>(), ids.as<int32_t>(), logits.shape[0], logits.shape[1], stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::SampleRows(const SampleRowsArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSampleRows(a));
  const int64_t rows = a.logits.shape[0], vocab = a.logits.shape[1];
  if (rows == 0) return absl::OkStatus();
  size_t needed = 0;
  FERRY_CUDA_RETURN_IF_ERROR(LaunchSampleRows(a.logits.as<const float>(), nullptr, rows, vocab, a.params, nullptr, nullptr, 0,
                                              &needed, stream_));
  const size_t uniforms_bytes = static_cast<size_t>(rows) * sizeof(double), total = needed + uniforms_bytes;
  if (sample_scratch_.bytes() < total) {
    sample_scratch_ = DeviceBuffer();
    FERRY_ASSIGN_OR_RETURN(sample_scratch_, Allocate(total));
  }
  double* uniforms = reinterpret_cast<double*>(static_cast<char*>(sample_scratch_.data()) + needed);
  FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(uniforms, a.uniforms, uniforms_bytes, cudaMemcpyHostToDevice, stream_));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchSampleRows(a.logits.as<const float>(), uniforms, rows, vocab, a.params, a.ids.as<int32_t>(),
                                              sample_scratch_.data(), needed, &needed, stream_));
  FERRY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));  // the caller's uniforms were read
  return absl::OkStatus();
}

absl::Status CudaBackend::SlotKvWrite(const SlotKvWriteArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSlotKvWrite(a));
  FERRY_RETURN_IF_ERROR(RequireKvType(a.k_slots));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchSlotKvWrite(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::SlotAttention(const SlotAttentionArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSlotAttention(a));
  FERRY_RETURN_IF_ERROR(RequireKvType(a.k_slots));
  if (a.k_slots.shape[3] > 256) return absl::InvalidArgumentError("cuda slot attention: head_dim above 256");
  FERRY_CUDA_RETURN_IF_ERROR(LaunchSlotAttention(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::H2OPlace(const H2OPlaceArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OPlace(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchH2OPlace(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::H2OUpdate(const H2OUpdateArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OUpdate(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchH2OUpdate(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::H2OPrefill(const H2OPrefillArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OPrefill(a));
  if (a.col_sums.shape[2] > 28 * 1024) return absl::InvalidArgumentError("cuda H2OPrefill: prompts above 28K tokens");
  FERRY_CUDA_RETURN_IF_ERROR(LaunchH2OPrefill(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::GatherHostRows(const void* host_table, size_t row_bytes, const std::vector<int32_t>& rows, void* dst) {
  return MoveRows(host_table, dst, row_bytes, rows, nullptr);
}

absl::Status CudaBackend::MoveRows(const void* src, void* dst, size_t row_bytes, const std::vector<int32_t>& src_rows,
                                   const std::vector<int32_t>* dst_rows) {
  if (src_rows.empty()) return absl::OkStatus();
  const size_t n = src_rows.size(), bytes = (dst_rows != nullptr ? 2 : 1) * n * sizeof(int32_t);
  if (gather_ids_.bytes() < bytes) {
    gather_ids_ = DeviceBuffer();
    FERRY_ASSIGN_OR_RETURN(gather_ids_, Allocate(bytes));
  }
  std::vector<int32_t> ids(src_rows);
  if (dst_rows != nullptr) ids.insert(ids.end(), dst_rows->begin(), dst_rows->end());
  // Stream-ordered: the previous kernel has read the old ids before these land; the copy from
  // pageable memory has taken `ids` when it returns.
  FERRY_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(gather_ids_.data(), ids.data(), bytes, cudaMemcpyHostToDevice, stream_));
  const int32_t* dev = static_cast<const int32_t*>(gather_ids_.data());
  FERRY_CUDA_RETURN_IF_ERROR(LaunchGatherHostRows(src, row_bytes, dev, static_cast<int64_t>(n), dst, stream_,
                                                  dst_rows != nullptr ? dev + n : nullptr));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyRows(const void* src, void* dst, size_t row_bytes, const std::vector<int32_t>& src_rows,
                                   const std::vector<int32_t>& dst_rows) {
  if (src_rows.size() != dst_rows.size()) return absl::InvalidArgumentError("CopyRows: src_rows and dst_rows differ in length");
  return MoveRows(src, dst, row_bytes, src_rows, &dst_rows);
}

absl::Status CudaBackend::MatMul(const MatMulArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateMatMul(a));
  for (const TensorView* t : {&a.a, &a.b, &a.out, &a.bias}) FERRY_RETURN_IF_ERROR(RequireDevice(*t, "matmul operand"));
  const int64_t m = a.out.shape[0], n = a.out.shape[1], k = a.trans_a ? a.a.shape[0] : a.a.shape[1];
  float beta = 0.0f;
  if (a.bias.data != nullptr) {
    FERRY_CUDA_RETURN_IF_ERROR(LaunchBroadcastRows(a.out.as<float>(), a.bias.as<const float>(), m, n, stream_));
    beta = 1.0f;
  }
  if (m == 0 || n == 0) return absl::OkStatus();
  if (k == 0) {
    if (beta == 0.0f) FERRY_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.out.data, 0, a.out.bytes(), stream_));
    return absl::OkStatus();
  }
  // Row-major out[m, n] is column-major out^T[n, m] = op(b)^T op(a)^T: b and a swap places, each
  // transposed when its row-major form is.
  const float alpha = 1.0f;
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasSgemm(cublas_, a.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, a.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                           static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, a.b.as<const float>(),
                                           static_cast<int>(a.b.shape[1]), a.a.as<const float>(), static_cast<int>(a.a.shape[1]), &beta,
                                           a.out.as<float>(), static_cast<int>(n)));
  return absl::OkStatus();
}

absl::Status CudaBackend::BceGrad(const BceGradArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateBceGrad(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchBceGrad(a, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::AdamStep(const AdamArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAdam(a));
  FERRY_CUDA_RETURN_IF_ERROR(LaunchAdam(a, stream_));
  return absl::OkStatus();
}

}  // namespace ferry::kernels::cuda

