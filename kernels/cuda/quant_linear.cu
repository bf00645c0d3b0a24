// Linear over group-wise q4/q8 weights (base/quant.h), fused: the packed values are read once and
// dequantized in registers (value = q * s + m, fp16 scale and minimum per group), with fp32 dot
// products reduced across the warp.
//
// QuantGemvKernel (power-of-two groups of 8 or more, k % 8 == 0: every group ParseQuantFormat's
// users pick for real models): one warp per kRowsPerWarp output rows; per step each lane takes 8
// consecutive columns of each of its rows (q4: one 32-bit word, q8: two), the warp 256, and the
// same 8 input values (two float4) serve all the warp's rows, so the inputs are read a quarter as
// often as the weights' rows. QuantLinearKernel is the general fallback (one warp per output row,
// two columns per lane per step). Both twin-tested against the CPU backend; their bandwidth
// against the HBM floor is pending a GPU run (bench_cuda BM_QuantLinear).
#include <cuda_fp16.h>

#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = 8;  // input rows per pass over the weights

template <bool kQ4>
__global__ void QuantLinearKernel(const float* __restrict__ x, const uint8_t* __restrict__ region, size_t scales_offset,
                                  size_t mins_offset, int group, int64_t n, int64_t k, int64_t m_total, const float* __restrict__ bias,
                                  bool relu, float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (m >= m_total) return;
  const __half* scales = reinterpret_cast<const __half*>(region + scales_offset);
  const __half* mins = reinterpret_cast<const __half*>(region + mins_offset);
  const int64_t groups = k / group;
  for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
    const int rows = static_cast<int>(n - t0 < kChunk ? n - t0 : kChunk);
    float acc[kChunk];
#pragma unroll
    for (int t = 0; t < kChunk; ++t) acc[t] = 0.0f;
    for (int64_t j = 2 * lane; j < k; j += 64) {
      const int64_t g = m * groups + j / group;
      const float s = __half2float(scales[g]);
      float w0, w1;
      if (kQ4) {
        const uint8_t b = region[(m * k + j) / 2];
        const float mn = __half2float(mins[g]);
        w0 = static_cast<float>(b & 0xF) * s + mn;
        w1 = static_cast<float>(b >> 4) * s + mn;
      } else {
        const int8_t* v = reinterpret_cast<const int8_t*>(region) + m * k + j;
        w0 = static_cast<float>(v[0]) * s;
        w1 = static_cast<float>(v[1]) * s;
      }
#pragma unroll
      for (int t = 0; t < kChunk; ++t) {
        if (t < rows) {
          const float2 xv = *reinterpret_cast<const float2*>(x + (t0 + t) * k + j);
          acc[t] += xv.x * w0 + xv.y * w1;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float v = acc[t];
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && t < rows) {
        v += bias != nullptr ? bias[m] : 0.0f;
        if (relu && v < 0.0f) v = 0.0f;
        out[(t0 + t) * m_total + m] = v;
      }
    }
  }
}

constexpr int kRowsPerWarp = 4;
constexpr int kGemvChunk = 4;  // input rows per pass

template <bool kQ4>
__global__ void QuantGemvKernel(const float* __restrict__ x, const uint8_t* __restrict__ region, size_t scales_offset,
                                size_t mins_offset, int group_shift, int64_t n, int64_t k, int64_t m_total,
                                const float* __restrict__ bias, bool relu, float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t m0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * kRowsPerWarp;
  if (m0 >= m_total) return;
  const __half* scales = reinterpret_cast<const __half*>(region + scales_offset);
  const __half* mins = reinterpret_cast<const __half*>(region + mins_offset);
  const int64_t groups = k >> group_shift;
  for (int64_t t0 = 0; t0 < n; t0 += kGemvChunk) {
    const int rows = static_cast<int>(n - t0 < kGemvChunk ? n - t0 : kGemvChunk);
    float acc[kRowsPerWarp][kGemvChunk];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int t = 0; t < kGemvChunk; ++t) acc[r][t] = 0.0f;
    }
    for (int64_t j = 8 * static_cast<int64_t>(lane); j < k; j += 256) {
      float w[kRowsPerWarp][8];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t m = m0 + r;
        if (m >= m_total) {
#pragma unroll
          for (int i = 0; i < 8; ++i) w[r][i] = 0.0f;
          continue;
        }
        const int64_t g = m * groups + (j >> group_shift);  // the 8 columns share one group
        const float s = __half2float(scales[g]);
        if (kQ4) {
          const uint32_t v = *reinterpret_cast<const uint32_t*>(region + (m * k + j) / 2);
          const float mn = __half2float(mins[g]);
#pragma unroll
          for (int i = 0; i < 8; ++i) w[r][i] = __fadd_rn(__fmul_rn(static_cast<float>((v >> (4 * i)) & 0xFu), s), mn);
        } else {
          const uint2 v = *reinterpret_cast<const uint2*>(region + m * k + j);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const uint32_t word = i < 4 ? v.x : v.y;
            w[r][i] = __fmul_rn(static_cast<float>(static_cast<int8_t>((word >> (8 * (i % 4))) & 0xFFu)), s);
          }
        }
      }
#pragma unroll
      for (int t = 0; t < kGemvChunk; ++t) {
        if (t < rows) {
          const float4 a = *reinterpret_cast<const float4*>(x + (t0 + t) * k + j);
          const float4 b = *reinterpret_cast<const float4*>(x + (t0 + t) * k + j + 4);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            acc[r][t] += a.x * w[r][0] + a.y * w[r][1] + a.z * w[r][2] + a.w * w[r][3] + b.x * w[r][4] + b.y * w[r][5] +
                         b.z * w[r][6] + b.w * w[r][7];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int t = 0; t < kGemvChunk; ++t) {
        float v = acc[r][t];
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        const int64_t m = m0 + r;
        if (lane == 0 && t < rows && m < m_total) {
          v += bias != nullptr ? bias[m] : 0.0f;
          if (relu && v < 0.0f) v = 0.0f;
          out[(t0 + t) * m_total + m] = v;
        }
      }
    }
  }
}

// Dequantizes the whole region into a row-major fp16 matrix (two values per thread), for the cuBLAS
// path of larger batches: the same arithmetic as the CPU (fp32 q * s + m), rounded to fp16 once.
template <bool kQ4>
__global__ void DequantizeToF16Kernel(const uint8_t* __restrict__ region, size_t scales_offset, size_t mins_offset, int group,
                                      int64_t k, int64_t pairs, __half* __restrict__ out) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int64_t e = 2 * p, row = e / k, j = e % k;
  const int64_t g = row * (k / group) + j / group;
  const float s = __half2float(reinterpret_cast<const __half*>(region + scales_offset)[g]);
  float w0, w1;
  if (kQ4) {
    const uint8_t b = region[e / 2];
    const float mn = __half2float(reinterpret_cast<const __half*>(region + mins_offset)[g]);
    w0 = static_cast<float>(b & 0xF) * s + mn;
    w1 = static_cast<float>(b >> 4) * s + mn;
  } else {
    const int8_t* v = reinterpret_cast<const int8_t*>(region) + e;
    w0 = static_cast<float>(v[0]) * s;
    w1 = static_cast<float>(v[1]) * s;
  }
  out[e] = __float2half_rn(w0);
  out[e + 1] = __float2half_rn(w1);
}

// One thread per pair of a bundle's 2d values (pairs never straddle a group: groups are even).
template <bool kQ4>
__global__ void DequantizeBundlesKernel(const uint8_t* __restrict__ bundles, size_t bundle_bytes, size_t scales_offset,
                                        size_t mins_offset, int group, int64_t two_d, int64_t pairs, __half* __restrict__ out) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int64_t e = 2 * p, row = e / two_d, j = e % two_d;
  const uint8_t* b = bundles + row * bundle_bytes;
  const int64_t g = j / group;
  const float s = __half2float(reinterpret_cast<const __half*>(b + scales_offset)[g]);
  float w0, w1;
  if (kQ4) {
    const uint8_t v = b[j / 2];
    const float mn = __half2float(reinterpret_cast<const __half*>(b + mins_offset)[g]);
    w0 = __fadd_rn(__fmul_rn(static_cast<float>(v & 0xF), s), mn);
    w1 = __fadd_rn(__fmul_rn(static_cast<float>(v >> 4), s), mn);
  } else {
    const int8_t* v = reinterpret_cast<const int8_t*>(b) + j;
    w0 = __fmul_rn(static_cast<float>(v[0]), s);
    w1 = __fmul_rn(static_cast<float>(v[1]), s);
  }
  out[e] = __float2half_rn(w0);
  out[e + 1] = __float2half_rn(w1);
}

}  // namespace

cudaError_t LaunchDequantizeToF16(const TensorView& weight, const QuantLayout& layout, void* out, cudaStream_t stream) {
  const int64_t m = weight.shape[0], k = weight.shape[1], pairs = m * k / 2;
  if (pairs == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((pairs + 255) / 256);
  if (weight.quant->kind == QuantKind::kQ4) {
    DequantizeToF16Kernel<true><<<blocks, 256, 0, stream>>>(weight.as<const uint8_t>(), layout.scales_offset, layout.mins_offset,
                                                           weight.quant->group, k, pairs, static_cast<__half*>(out));
  } else {
    DequantizeToF16Kernel<false><<<blocks, 256, 0, stream>>>(weight.as<const uint8_t>(), layout.scales_offset, layout.mins_offset,
                                                            weight.quant->group, k, pairs, static_cast<__half*>(out));
  }
  return cudaGetLastError();
}

cudaError_t LaunchDequantizeBundles(const TensorView& bundles, const BundleQuantLayout& layout, int64_t d, void* out,
                                    cudaStream_t stream) {
  const int64_t m = bundles.shape[0], pairs = m * d;  // m x 2d values
  if (pairs == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((pairs + 255) / 256);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, 256, 0, stream>>>(bundles.as<const uint8_t>(), layout.bytes, layout.row.scales_offset, layout.row.mins_offset,
                                       bundles.quant->group, 2 * d, pairs, static_cast<__half*>(out));
  };
  if (bundles.quant->kind == QuantKind::kQ4) {
    launch(DequantizeBundlesKernel<true>);
  } else {
    launch(DequantizeBundlesKernel<false>);
  }
  return cudaGetLastError();
}

cudaError_t LaunchQuantLinear(const LinearArgs& a, const QuantLayout& layout, cudaStream_t stream) {
  const int64_t n = a.in.shape[0], k = a.in.shape[1], m = a.weight.shape[0];
  if (n == 0 || m == 0) return cudaSuccess;
  const float* bias = a.bias.data != nullptr ? a.bias.as<const float>() : nullptr;
  const int group = a.weight.quant->group;
  // The vectorized kernel's loads: 8 columns in one power-of-two group, q4 words and q8 pairs of
  // words aligned (k % 8 and the region's alignment), the inputs' float4s 16-byte aligned.
  const bool gemv = group >= 8 && (group & (group - 1)) == 0 && k % 8 == 0 && reinterpret_cast<uintptr_t>(a.weight.data) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(a.in.data) % 16 == 0;
  if (gemv) {
    int shift = 0;
    while ((1 << shift) < group) ++shift;
    const int64_t per_block = static_cast<int64_t>(kWarpsPerBlock) * kRowsPerWarp;
    const dim3 grid(static_cast<unsigned>((m + per_block - 1) / per_block));
    if (a.weight.quant->kind == QuantKind::kQ4) {
      QuantGemvKernel<true><<<grid, kWarpsPerBlock * 32, 0, stream>>>(a.in.as<const float>(), a.weight.as<const uint8_t>(),
                                                                      layout.scales_offset, layout.mins_offset, shift, n, k, m, bias,
                                                                      a.relu, a.out.as<float>());
    } else {
      QuantGemvKernel<false><<<grid, kWarpsPerBlock * 32, 0, stream>>>(a.in.as<const float>(), a.weight.as<const uint8_t>(),
                                                                       layout.scales_offset, layout.mins_offset, shift, n, k, m, bias,
                                                                       a.relu, a.out.as<float>());
    }
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>((m + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (a.weight.quant->kind == QuantKind::kQ4) {
    QuantLinearKernel<true><<<grid, kWarpsPerBlock * 32, 0, stream>>>(a.in.as<const float>(), a.weight.as<const uint8_t>(),
                                                                      layout.scales_offset, layout.mins_offset, a.weight.quant->group,
                                                                      n, k, m, bias, a.relu, a.out.as<float>());
  } else {
    QuantLinearKernel<false><<<grid, kWarpsPerBlock * 32, 0, stream>>>(a.in.as<const float>(), a.weight.as<const uint8_t>(),
                                                                       layout.scales_offset, layout.mins_offset, a.weight.quant->group,
                                                                       n, k, m, bias, a.relu, a.out.as<float>());
  }
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
