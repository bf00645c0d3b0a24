// LayerNorm, one block per row: the mean, then the variance around it (two passes, as the CPU twin
// does in double), then the affine output. fp32 throughout. Rows of up to 12288 floats (every OPT
// width) whose pointers are 16-byte aligned are read once into registers as float4s; others use the
// general kernel, which reads the row three times (from L1/L2 after the first).
#include "kernels/cuda/block_sum.cuh"
#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

constexpr int kThreads = 256;


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

// kAdd: the residual add fused in front: the row is in[] + delta[], written back to in[] (the
// residual stream) before the LayerNorm of it goes to out[] (which may be in[]).
template <int kVec, bool kAdd>  // float4s per thread
__global__ void __launch_bounds__(kThreads) LayerNormRegKernel(const float* in, const float* __restrict__ delta,
                                                               const float* __restrict__ gamma, const float* __restrict__ beta,
                                                               float* out, int64_t dim, float eps) {
  __shared__ float shared[32];
  const float4* x = reinterpret_cast<const float4*>(in + blockIdx.x * dim);
  float4* y = reinterpret_cast<float4*>(out + blockIdx.x * dim);
  const float4* g = reinterpret_cast<const float4*>(gamma);
  const float4* b = reinterpret_cast<const float4*>(beta);
  const int n4 = static_cast<int>(dim / 4);
  float4 v[kVec];
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int j = threadIdx.x + i * kThreads;
    v[i] = j < n4 ? x[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (kAdd && j < n4) {
      const float4 d = reinterpret_cast<const float4*>(delta + blockIdx.x * dim)[j];
      v[i] = make_float4(v[i].x + d.x, v[i].y + d.y, v[i].z + d.z, v[i].w + d.w);
      reinterpret_cast<float4*>(const_cast<float*>(in) + blockIdx.x * dim)[j] = v[i];
    }
    s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
  }
  const float mean = BlockSum(s, shared) / static_cast<float>(dim);
  float q = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int j = threadIdx.x + i * kThreads;
    if (j < n4) {
      const float a = v[i].x - mean, bb = v[i].y - mean, c = v[i].z - mean, d = v[i].w - mean;
      q += (a * a + bb * bb) + (c * c + d * d);
    }
  }
  const float inv = rsqrtf(BlockSum(q, shared) / static_cast<float>(dim) + eps);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int j = threadIdx.x + i * kThreads;
    if (j < n4) {
      const float4 gg = g[j], be = b[j];
      y[j] = make_float4((v[i].x - mean) * inv * gg.x + be.x, (v[i].y - mean) * inv * gg.y + be.y,
                         (v[i].z - mean) * inv * gg.z + be.z, (v[i].w - mean) * inv * gg.w + be.w);
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

namespace {

// Launches the register kernel when the row fits it (returns false otherwise).
template <bool kAdd>
bool LaunchRegister(const float* in, const float* delta, const float* gamma, const float* beta, float* out, int64_t rows,
                    int64_t dim, float eps, cudaStream_t stream) {
  const bool vec = dim % 4 == 0 && Aligned16(in) && Aligned16(out) && Aligned16(gamma) && Aligned16(beta) &&
                   (!kAdd || Aligned16(delta));
  if (vec && dim <= 4 * kThreads * 4) {
    LayerNormRegKernel<4, kAdd><<<rows, kThreads, 0, stream>>>(in, delta, gamma, beta, out, dim, eps);
    return true;
  }
  if (vec && dim <= 4 * kThreads * 12) {
    LayerNormRegKernel<12, kAdd><<<rows, kThreads, 0, stream>>>(in, delta, gamma, beta, out, dim, eps);
    return true;
  }
  return false;
}

}  // namespace

cudaError_t LaunchLayerNorm(const LayerNormArgs& a, cudaStream_t stream) {
  const int64_t rows = a.in.shape[0];
  if (rows == 0) return cudaSuccess;
  if (LaunchRegister<false>(a.in.as<const float>(), nullptr, a.gamma.as<const float>(), a.beta.as<const float>(),
                            a.out.as<float>(), rows, a.in.shape[1], a.eps, stream)) {
    return cudaGetLastError();
  }
  LayerNormKernel<<<rows, kThreads, 0, stream>>>(a.in.as<const float>(), a.gamma.as<const float>(),
                                                 a.beta.as<const float>(), a.out.as<float>(), a.in.shape[1], a.eps);
  return cudaGetLastError();
}

cudaError_t LaunchAddLayerNorm(const AddLayerNormArgs& a, cudaStream_t stream) {
  const int64_t rows = a.residual.shape[0], dim = a.residual.shape[1];
  if (rows == 0) return cudaSuccess;
  if (LaunchRegister<true>(a.residual.as<const float>(), a.delta.as<const float>(), a.gamma.as<const float>(),
                           a.beta.as<const float>(), a.out.as<float>(), rows, dim, a.eps, stream)) {
    return cudaGetLastError();
  }
  const cudaError_t e = LaunchAdd(a.residual.as<const float>(), a.delta.as<const float>(), a.residual.as<float>(), rows * dim, stream);
  if (e != cudaSuccess) return e;
  return LaunchLayerNorm({a.residual, a.gamma, a.beta, a.out, a.eps}, stream);
}

}  // namespace ferry::kernels::cuda
