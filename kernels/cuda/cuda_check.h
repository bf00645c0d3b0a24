// CUDA and cuBLAS error checks that return absl::Status naming the failed call, and a launch
// check for after every kernel launch. Host-only header.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ferry::kernels::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  const absl::StatusCode code =
      err == cudaErrorMemoryAllocation ? absl::StatusCode::kResourceExhausted
      : (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) ? absl::StatusCode::kUnavailable
                                                                           : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(call, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
                                         ") at ", file, ":", line));
}

inline const char* CublasName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

inline absl::Status CublasStatus(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const absl::StatusCode code =
      s == CUBLAS_STATUS_ALLOC_FAILED ? absl::StatusCode::kResourceExhausted : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(call, " failed: ", CublasName(s), " at ", file, ":", line));
}

}  // namespace ferry::kernels::cuda

#define FERRY_CUDA_RETURN_IF_ERROR(call) \
  FERRY_RETURN_IF_ERROR(::ferry::kernels::cuda::CudaStatus((call), #call, __FILE__, __LINE__))
#define FERRY_CUBLAS_RETURN_IF_ERROR(call) \
  FERRY_RETURN_IF_ERROR(::ferry::kernels::cuda::CublasStatus((call), #call, __FILE__, __LINE__))
// After a kernel launch: configuration errors (bad grid, too much shared memory) surface here.
#define FERRY_CUDA_LAUNCH_CHECK(what) \
  FERRY_RETURN_IF_ERROR(::ferry::kernels::cuda::CudaStatus(cudaGetLastError(), what, __FILE__, __LINE__))
