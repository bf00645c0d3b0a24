// Training ops of the CUDA backend (Deja Vu's predictors trained on the GPU): the BCE gradient
// over bit-packed labels, its bias gradient summed per column over the rows in order (as the CPU
// twin), Adam, and the bias rows a MatMul starts from. The GEMMs themselves are cuBLAS SGEMMs.
#include <algorithm>

#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

unsigned Grid(int64_t n, int threads) { return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535)); }

__global__ void BroadcastRowsKernel(float* __restrict__ out, const float* __restrict__ row, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = row[i % cols];
  }
}

__global__ void BceGradKernel(const float* __restrict__ z, const uint8_t* __restrict__ bits, float* __restrict__ g, int64_t rows,
                              int64_t f, int64_t row_bytes, float w_pos, float w_neg) {
  const int64_t n = rows * f;
  const float rows_f = static_cast<float>(rows);
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < n; x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = x / f, j = x - i * f;
    const float s = 1.0f / (1.0f + expf(-z[x]));
    const bool on = (bits[i * row_bytes + j / 8] >> (j % 8)) & 1;
    g[x] = (on ? w_pos * (s - 1.0f) : w_neg * s) / rows_f;
  }
}

// One thread per column: the rows in order, as the CPU sums them.
__global__ void ColumnSumKernel(const float* __restrict__ g, float* __restrict__ out, int64_t rows, int64_t f) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= f) return;
  float s = 0.0f;
  for (int64_t i = 0; i < rows; ++i) s += g[i * f + j];
  out[j] = s;
}

__global__ void AdamKernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, int64_t n,
                           float lr, float b1, float b2, float eps, float c1, float c2) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i];
    const float mi = b1 * m[i] + (1 - b1) * gi;
    const float vi = b2 * v[i] + (1 - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] -= lr * (mi / c1) / (sqrtf(vi / c2) + eps);
  }
}

}  // namespace

cudaError_t LaunchBroadcastRows(float* out, const float* row, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  BroadcastRowsKernel<<<Grid(rows * cols, 256), 256, 0, stream>>>(out, row, rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchBceGrad(const BceGradArgs& a, cudaStream_t stream) {
  const int64_t rows = a.z.shape[0], f = a.z.shape[1];
  if (f == 0) return cudaSuccess;
  if (rows > 0) {
    BceGradKernel<<<Grid(rows * f, 256), 256, 0, stream>>>(a.z.as<const float>(), a.labels.as<const uint8_t>(), a.grad.as<float>(), rows,
                                                         f, a.labels.shape[1], a.w_pos, a.w_neg);
  }
  ColumnSumKernel<<<Grid(f, 128), 128, 0, stream>>>(a.grad.as<const float>(), a.grad_bias.as<float>(), rows, f);
  return cudaGetLastError();
}

cudaError_t LaunchAdam(const AdamArgs& a, cudaStream_t stream) {
  const int64_t n = a.w.numel();
  if (n == 0) return cudaSuccess;
  AdamKernel<<<Grid(n, 256), 256, 0, stream>>>(a.w.as<float>(), a.g.as<const float>(), a.m.as<float>(), a.v.as<float>(), n, a.lr, a.beta1,
                                               a.beta2, a.eps, a.c1, a.c2);
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
