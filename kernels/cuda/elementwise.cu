// Elementwise and gather kernels of the CUDA backend: row gather with dtype conversion, residual
// add, fp32 -> fp16/bf16 conversion, bias + ReLU epilogue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

template <typename T>
__device__ inline float ToFloat(T v);
template <>
__device__ inline float ToFloat<float>(float v) { return v; }
template <>
__device__ inline float ToFloat<__half>(__half v) { return __half2float(v); }
template <>
__device__ inline float ToFloat<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// One block per output row.
template <typename T>
__global__ void GatherRowsKernel(const T* __restrict__ table, const int32_t* __restrict__ ids, int offset,
                                 int64_t dim, float* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(ids[blockIdx.x]) + offset;
  const T* src = table + row * dim;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * dim;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = ToFloat(src[j]);
}

__global__ void AddKernel(const float* __restrict__ a, const float* __restrict__ b, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = a[i] + b[i];
  }
}

template <typename T>
__global__ void ConvertKernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n);
template <>
__global__ void ConvertKernel<__half>(const float* __restrict__ src, __half* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = __float2half_rn(src[i]);
  }
}
template <>
__global__ void ConvertKernel<__nv_bfloat16>(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = __float2bfloat16_rn(src[i]);
  }
}

// The two-term split of fp32 activations for a 16-bit GEMM: hi = round(x), lo = round((x - hi) * scale),
// written as rows [0, n) and [n, 2n) of one [2n, k] matrix, so that W.x = W.hi + W.lo / scale keeps
// about twice the 16-bit type's mantissa (the scale keeps lo out of fp16's subnormals).
template <typename T>
__device__ T FromFloat(float v);
template <>
__device__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__global__ void SplitKernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = src[i];
    const T hi = FromFloat<T>(x);
    dst[i] = hi;
    dst[n + i] = FromFloat<T>((x - ToFloat<T>(hi)) * scale);
  }
}

// out[r, c] = relu?(tmp[r, c] + tmp[rows + r, c] * inv_scale + bias[c]).
__global__ void CombineSplitKernel(const float* __restrict__ tmp, float* __restrict__ out, const float* __restrict__ bias,
                                   int64_t rows, int64_t cols, float inv_scale, bool relu) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = tmp[i] + tmp[n + i] * inv_scale + (bias != nullptr ? bias[i % cols] : 0.0f);
    out[i] = relu ? fmaxf(v, 0.0f) : v;
  }
}

template <typename T>
__global__ void StridedBiasReluKernel(float* act, const T* __restrict__ bias, int64_t stride, int64_t rows, int64_t m) {
  const int64_t n = rows * m;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    act[i] = fmaxf(act[i] + ToFloat<T>(bias[(i % m) * stride]), 0.0f);
  }
}

// One block per row, in the widest unit the row size and both pointers allow; reads pinned host
// memory over the bus (zero-copy), so one launch gathers any number of scattered rows.
template <typename U>
__global__ void GatherHostRowsKernel(const char* __restrict__ table, size_t row_bytes, const int32_t* __restrict__ rows,
                                     const int32_t* __restrict__ dst_rows, char* __restrict__ dst) {
  const U* src = reinterpret_cast<const U*>(table + static_cast<size_t>(rows[blockIdx.x]) * row_bytes);
  const size_t to = dst_rows != nullptr ? static_cast<size_t>(dst_rows[blockIdx.x]) : blockIdx.x;
  U* out = reinterpret_cast<U*>(dst + to * row_bytes);
  const size_t units = row_bytes / sizeof(U);
  for (size_t i = threadIdx.x; i < units; i += blockDim.x) out[i] = src[i];
}

__global__ void BiasReluKernel(float* out, const float* __restrict__ bias, int64_t rows, int64_t cols, bool relu) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = out[i] + (bias != nullptr ? bias[i % cols] : 0.0f);
    out[i] = relu ? fmaxf(v, 0.0f) : v;
  }
}

// One block per row: each thread scans a strided part, then a shared-memory tree keeps the larger
// value, and the lower index among equal values.
__global__ void ArgMaxRowsKernel(const float* __restrict__ logits, int32_t* __restrict__ ids, int64_t vocab) {
  __shared__ float best_v[256];
  __shared__ int32_t best_i[256];
  const float* row = logits + blockIdx.x * vocab;
  float v = -INFINITY;
  int32_t idx = 0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    if (row[j] > v) v = row[j], idx = static_cast<int32_t>(j);
  }
  if (v == -INFINITY) idx = static_cast<int32_t>(vocab);  // nothing seen: loses every tie
  best_v[threadIdx.x] = v;
  best_i[threadIdx.x] = idx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = best_v[threadIdx.x + s];
      const int32_t oi = best_i[threadIdx.x + s];
      if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
        best_v[threadIdx.x] = ov;
        best_i[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) ids[blockIdx.x] = best_i[0] < vocab ? best_i[0] : 0;
}

unsigned GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace

cudaError_t LaunchGatherRows(const GatherRowsArgs& a, cudaStream_t stream) {
  const int64_t n = a.out.shape[0], dim = a.out.shape[1];
  if (n == 0) return cudaSuccess;
  const int threads = dim >= 256 ? 256 : 128;
  const int32_t* ids = a.ids.as<const int32_t>();
  switch (a.table.dtype) {
    case DType::kF32:
      GatherRowsKernel<<<n, threads, 0, stream>>>(a.table.as<const float>(), ids, a.offset, dim, a.out.as<float>());
      break;
    case DType::kF16:
      GatherRowsKernel<<<n, threads, 0, stream>>>(a.table.as<const __half>(), ids, a.offset, dim, a.out.as<float>());
      break;
    case DType::kBF16:
      GatherRowsKernel<<<n, threads, 0, stream>>>(a.table.as<const __nv_bfloat16>(), ids, a.offset, dim, a.out.as<float>());
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchAdd(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  AddKernel<<<GridFor(n, 256), 256, 0, stream>>>(a, b, out, n);
  return cudaGetLastError();
}

cudaError_t LaunchConvertFromF32(const float* src, void* dst, DType dtype, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kF16) {
    ConvertKernel<__half><<<GridFor(n, 256), 256, 0, stream>>>(src, static_cast<__half*>(dst), n);
  } else if (dtype == DType::kBF16) {
    ConvertKernel<__nv_bfloat16><<<GridFor(n, 256), 256, 0, stream>>>(src, static_cast<__nv_bfloat16*>(dst), n);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchArgMaxRows(const float* logits, int32_t* ids, int64_t rows, int64_t vocab, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  ArgMaxRowsKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(logits, ids, vocab);
  return cudaGetLastError();
}

cudaError_t LaunchBiasRelu(float* out, const float* bias, int64_t rows, int64_t cols, bool relu, cudaStream_t stream) {
  if (rows * cols == 0 || (bias == nullptr && !relu)) return cudaSuccess;
  BiasReluKernel<<<GridFor(rows * cols, 256), 256, 0, stream>>>(out, bias, rows, cols, relu);
  return cudaGetLastError();
}

cudaError_t LaunchSplitFromF32(const float* src, void* dst, DType dtype, int64_t n, float scale, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (dtype == DType::kF16) {
    SplitKernel<__half><<<GridFor(n, 256), 256, 0, stream>>>(src, static_cast<__half*>(dst), n, scale);
  } else if (dtype == DType::kBF16) {
    SplitKernel<__nv_bfloat16><<<GridFor(n, 256), 256, 0, stream>>>(src, static_cast<__nv_bfloat16*>(dst), n, scale);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchCombineSplit(const float* tmp, float* out, const float* bias, int64_t rows, int64_t cols, float inv_scale,
                               bool relu, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  CombineSplitKernel<<<GridFor(rows * cols, 256), 256, 0, stream>>>(tmp, out, bias, rows, cols, inv_scale, relu);
  return cudaGetLastError();
}

cudaError_t LaunchStridedBiasRelu(float* act, const void* bias, DType dtype, int64_t stride, int64_t rows, int64_t m,
                                  cudaStream_t stream) {
  const int64_t n = rows * m;
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kF16:
      StridedBiasReluKernel<__half><<<GridFor(n, 256), 256, 0, stream>>>(act, static_cast<const __half*>(bias), stride, rows, m);
      break;
    case DType::kBF16:
      StridedBiasReluKernel<__nv_bfloat16>
          <<<GridFor(n, 256), 256, 0, stream>>>(act, static_cast<const __nv_bfloat16*>(bias), stride, rows, m);
      break;
    case DType::kF32:
      StridedBiasReluKernel<float><<<GridFor(n, 256), 256, 0, stream>>>(act, static_cast<const float*>(bias), stride, rows, m);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchGatherHostRows(const void* host_table, size_t row_bytes, const int32_t* rows, int64_t n, void* dst,
                                 cudaStream_t stream, const int32_t* dst_rows) {
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  const uintptr_t a = reinterpret_cast<uintptr_t>(host_table) | reinterpret_cast<uintptr_t>(dst) | row_bytes;
  const char* t = static_cast<const char*>(host_table);
  char* d = static_cast<char*>(dst);
  const unsigned blocks = static_cast<unsigned>(n);
  if (a % 16 == 0) {
    GatherHostRowsKernel<uint4><<<blocks, 256, 0, stream>>>(t, row_bytes, rows, dst_rows, d);
  } else if (a % 4 == 0) {
    GatherHostRowsKernel<uint32_t><<<blocks, 256, 0, stream>>>(t, row_bytes, rows, dst_rows, d);
  } else if (a % 2 == 0) {
    GatherHostRowsKernel<uint16_t><<<blocks, 256, 0, stream>>>(t, row_bytes, rows, dst_rows, d);
  } else {
    GatherHostRowsKernel<uint8_t><<<blocks, 256, 0, stream>>>(t, row_bytes, rows, dst_rows, d);
  }
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
