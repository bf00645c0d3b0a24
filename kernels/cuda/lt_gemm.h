// GEMMs through cuBLASLt with the bias and the ReLU in the epilogue, so that the output is written
// once (cublasGemmEx followed by a bias/ReLU pass reads and writes it again). Column-major, as
// cuBLAS sees ferry's row-major tensors: D[m, n] = op(A) B (+ bias[m], ReLU), A 16-bit or fp32,
// B the same type, D fp32, fp32 accumulation. Descriptors and the heuristic's algorithm are cached
// per shape, types, epilogue and pointer alignments (the heuristic's pick depends on them), so a
// forward's repeated shapes pay the heuristic once. Host-only header.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::kernels::cuda {

class LtGemm {
 public:
  LtGemm() = default;
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  absl::Status Init();
  // The workspace cuBLASLt may use (device memory owned by the caller, >= 256-byte aligned).
  void SetWorkspace(void* data, size_t bytes) {
    workspace_ = data;
    workspace_bytes_ = bytes;
  }

  struct Call {
    const void* a;         // [m, k] with row stride lda (a_mk), or [k, m] with row stride lda
    bool a_mk;             // true: D = A^T-as-stored (PyTorch's [out, in] weights)
    int64_t lda;
    const void* b;         // [n, k] row-major, ld k
    cudaDataType type;     // A's and B's type
    int64_t m, n, k;
    float* d;              // [n, m] row-major
    const float* bias;     // [m] or nullptr
    bool relu;
  };
  // True when the GEMM was queued; false (nothing queued) where cuBLASLt has no algorithm for the
  // call or refuses the one its heuristic chose, and the caller falls back to cublasGemmEx and a
  // separate bias/ReLU pass; any other failure is an error.
  absl::StatusOr<bool> Run(const Call& c, cudaStream_t stream);

  int64_t calls() const { return calls_; }
  int64_t unsupported() const { return unsupported_; }

 private:
  struct Plan {
    // The key.
    int64_t m = 0, n = 0, k = 0, lda = 0;
    bool a_mk = false, relu = false, bias = false;
    cudaDataType type = CUDA_R_32F;
    uint32_t align_a = 0, align_b = 0, align_d = 0, align_bias = 0;
    // The value.
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool supported = false;
  };
  static void Destroy(Plan& p);
  absl::Status MakePlan(Plan& p, const Call& c);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::vector<Plan> plans_;  // at most kMaxPlans, replaced round-robin
  size_t next_ = 0;
  int64_t calls_ = 0, unsupported_ = 0;
  static constexpr size_t kMaxPlans = 64;
};

}  // namespace ferry::kernels::cuda
