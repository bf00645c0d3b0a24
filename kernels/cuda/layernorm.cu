// LayerNorm, one block per row: the mean, then the variance around it (two passes over a row held
// in registers/L1, as the CPU twin does in double), then the affine output. fp32 throughout.
#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float BlockSum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x < 32) {
    total = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    if (threadIdx.x == 0) shared[0] = total;
  }
  __syncthreads();
  total = shared[0];
  __syncthreads();  // shared is reused by the next call
  return total;
}

// in, out: [rows, dim]; gamma, beta: [dim]
__global__ void LayerNormKernel(const float* in, const float* __restrict__ gamma, const float* __restrict__ beta,
                                float* out, int64_t dim, float eps) {
  __shared__ float shared[32];
  const float* x = in + blockIdx.x * dim;
  float* y = out + blockIdx.x * dim;
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) s += x[j];
  const float mean = BlockSum(s, shared) / static_cast<float>(dim);
  float v = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const float d = x[j] - mean;
    v += d * d;
  }
  const float var = BlockSum(v, shared) / static_cast<float>(dim);
  const float inv = rsqrtf(var + eps);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) y[j] = (x[j] - mean) * inv * gamma[j] + beta[j];
}

}  // namespace

cudaError_t LaunchLayerNorm(const LayerNormArgs& a, cudaStream_t stream) {
  const int64_t rows = a.in.shape[0];
  if (rows == 0) return cudaSuccess;
  LayerNormKernel<<<rows, kThreads, 0, stream>>>(a.in.as<const float>(), a.gamma.as<const float>(),
                                                 a.beta.as<const float>(), a.out.as<float>(), a.in.shape[1], a.eps);
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
