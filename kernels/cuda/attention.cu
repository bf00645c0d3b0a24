// Causal attention over the KV cache, one block per (query, head); the same kernel serves prefill
// (many queries per sequence) and decode (one), sequences of any lengths in one launch. Each warp
// walks a strided subset of the cache entries 0..pos with an online softmax (running max, running
// sum, rescaled accumulator), so no score matrix is ever stored; the warps' partial results are
// merged in shared memory at the end. K is read once. For H2O, the raw scores s_j that each warp
// computes can be written to a [n, heads, len] side buffer and normalized with the final (max,
// sum) in a small pass over those scores, not over K.
#include <cfloat>

#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

__global__ void AttentionKernel(const float* __restrict__ q, const float* __restrict__ k_cache,
                                const float* __restrict__ v_cache, const int32_t* __restrict__ seq_ids,
                                const int32_t* __restrict__ positions, float* __restrict__ out, int64_t max_len,
                                int64_t width, int head_dim, float scale) {
  __shared__ float s_max[kWarps], s_sum[kWarps];
  __shared__ float s_acc[kWarps][kMaxPerLane * 32];
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t len = static_cast<int64_t>(positions[i]) + 1;
  const int64_t base = static_cast<int64_t>(seq_ids[i]) * max_len * width + static_cast<int64_t>(h) * head_dim;

  float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    const int d = lane + 32 * r;
    qv[r] = d < head_dim ? q[i * width + static_cast<int64_t>(h) * head_dim + d] : 0.0f;
    acc[r] = 0.0f;
  }
  float m = -FLT_MAX, l = 0.0f;
  for (int64_t j = warp; j < len; j += kWarps) {
    const float* kr = k_cache + base + j * width;
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kMaxPerLane; ++r) {
      const int d = lane + 32 * r;
      if (d < head_dim) s += qv[r] * kr[d];
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * corr + p;
    const float* vr = v_cache + base + j * width;
#pragma unroll
    for (int r = 0; r < kMaxPerLane; ++r) {
      const int d = lane + 32 * r;
      if (d < head_dim) acc[r] = acc[r] * corr + p * vr[d];
    }
    m = m_new;
  }
  if (lane == 0) {
    s_max[warp] = m;
    s_sum[warp] = l;
  }
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) s_acc[warp][lane + 32 * r] = acc[r];
  __syncthreads();
  float gmax = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w) gmax = fmaxf(gmax, s_max[w]);
  float total = 0.0f;
  float weight[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = s_sum[w] > 0.0f ? expf(s_max[w] - gmax) : 0.0f;
    total += s_sum[w] * weight[w];
  }
  const float inv = 1.0f / total;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) o += s_acc[w][d] * weight[w];
    out[i * width + static_cast<int64_t>(h) * head_dim + d] = o * inv;
  }
}

}  // namespace

cudaError_t LaunchAttention(const AttentionArgs& a, cudaStream_t stream) {
  const int64_t n = a.q.shape[0], width = a.q.shape[1];
  const int head_dim = static_cast<int>(width / a.num_heads);
  if (head_dim > kMaxPerLane * 32) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(a.num_heads));
  AttentionKernel<<<grid, kWarps * 32, 0, stream>>>(a.q.as<const float>(), a.k_cache.as<const float>(),
                                                    a.v_cache.as<const float>(), a.seq_ids.as<const int32_t>(),
                                                    a.positions.as<const int32_t>(), a.out.as<float>(),
                                                    a.k_cache.shape[1], width, head_dim, a.scale);
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
