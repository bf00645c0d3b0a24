// The Llama-family ops of the CUDA backend: RMSNorm (one block per row, the residual add fused in
// front when asked), rotary embeddings in place (one thread per rotated pair: (token, head, d) for
// d < rotary_dim / 2, with accurate cosf/sinf of the fp32 angle as the CPU twin computes it), and
// silu(gate) * up, elementwise. fp32 throughout.
#include "kernels/cuda/block_sum.cuh"
#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

constexpr int kThreads = 256;


// in, out: [rows, dim] (out may alias in); with delta, in[] += delta[] first (the residual stream).
__global__ void RmsNormKernel(float* in, const float* __restrict__ delta, const float* __restrict__ gamma, float* out,
                              int64_t dim, float eps) {
  __shared__ float shared[32];
  float* x = in + blockIdx.x * dim;
  float* y = out + blockIdx.x * dim;
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    float v = x[j];
    if (delta != nullptr) {
      v += delta[blockIdx.x * dim + j];
      x[j] = v;
    }
    s += v * v;
  }
  const float inv = rsqrtf(BlockSum(s, shared) / static_cast<float>(dim) + eps);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) y[j] = gamma[j] * (x[j] * inv);
}

__global__ void RopeKernel(float* __restrict__ x, const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                           const int32_t* __restrict__ freq_rows, int64_t n, int heads, int head_dim, int half,
                           float attention_scaling) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * heads * half) return;
  const int d = static_cast<int>(idx % half);
  const int64_t th = idx / half;  // token * heads + head
  const int64_t i = th / heads;
  const float* f = inv_freq + (freq_rows != nullptr ? freq_rows[i] : 0) * static_cast<int64_t>(half);
  const float angle = static_cast<float>(positions[i]) * f[d];
  const float c = cosf(angle) * attention_scaling, s = sinf(angle) * attention_scaling;
  float* row = x + th * head_dim;
  const float x1 = row[d], x2 = row[d + half];
  row[d] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
  row[d + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

__global__ void SiluMulKernel(const float* gate, const float* up, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = gate[i];
  out[i] = __fmul_rn(__fdiv_rn(g, 1.0f + expf(-g)), up[i]);
}

unsigned Blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t LaunchRmsNorm(const RmsNormArgs& a, cudaStream_t stream) {
  const int64_t rows = a.in.shape[0];
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<<<rows, kThreads, 0, stream>>>(a.in.as<float>(), nullptr, a.gamma.as<const float>(), a.out.as<float>(),
                                               a.in.shape[1], a.eps);
  return cudaGetLastError();
}

cudaError_t LaunchAddRmsNorm(const AddRmsNormArgs& a, cudaStream_t stream) {
  const int64_t rows = a.residual.shape[0];
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<<<rows, kThreads, 0, stream>>>(a.residual.as<float>(), a.delta.as<const float>(), a.gamma.as<const float>(),
                                               a.out.as<float>(), a.residual.shape[1], a.eps);
  return cudaGetLastError();
}

cudaError_t LaunchRope(const RopeArgs& a, cudaStream_t stream) {
  const int64_t n = a.x.shape[0];
  const int heads = a.num_heads, head_dim = static_cast<int>(a.x.shape[1] / heads), half = a.rotary_dim / 2;
  const int64_t items = n * heads * half;
  if (items == 0) return cudaSuccess;
  RopeKernel<<<Blocks(items), kThreads, 0, stream>>>(a.x.as<float>(), a.positions.as<const int32_t>(), a.inv_freq.as<const float>(),
                                                     a.freq_rows.data != nullptr ? a.freq_rows.as<const int32_t>() : nullptr, n,
                                                     heads, head_dim, half, a.attention_scaling);
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(const SiluMulArgs& a, cudaStream_t stream) {
  const int64_t n = a.gate.numel();
  if (n == 0) return cudaSuccess;
  SiluMulKernel<<<Blocks(n), kThreads, 0, stream>>>(a.gate.as<const float>(), a.up.as<const float>(), a.out.as<float>(), n);
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
