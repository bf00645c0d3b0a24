// How the CUDA attention kernels read and write a KV cache of any type: F32, F16, or a group-wise
// q8/q4 region (base/quant.h's layout: packed values, then one fp16 scale per group, then for q4
// one fp16 minimum per group). A cache is passed by value as a small accessor over element
// offsets, so every kernel is written once and computes in fp32 whatever the cache holds.
//
// Dequantization is exact fp32 arithmetic on what the cache stores (q * s, q * s + m, no fused
// multiply-add), and quantization is the CPU twin's (base/quant.cc) operation for operation:
// min/max (q4) or the absolute maximum (q8) of the group, the scale rounded to fp16 to nearest,
// codes rounded to nearest even and clamped, so a cache written here is bitwise the CPU's.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace ferry::kernels::cuda {

// F32 or F16 elements.
template <typename T>
struct DenseKv {
  T* p;
  __device__ __forceinline__ float at(int64_t e) const {
    if constexpr (sizeof(T) == 2) {
      return __half2float(p[e]);
    } else {
      return p[e];
    }
  }
  // Elements e, e + 1 (e even; F16: one 4-byte load).
  __device__ __forceinline__ float2 at2(int64_t e) const {
    if constexpr (sizeof(T) == 2) {
      return __half22float2(*reinterpret_cast<const __half2*>(p + e));
    } else {
      return make_float2(p[e], p[e + 1]);
    }
  }
  // Elements e..e + 3 (e a multiple of 4; 16-byte aligned for F32, 8 for F16).
  __device__ __forceinline__ float4 at4(int64_t e) const {
    if constexpr (sizeof(T) == 2) {
      const uint2 u = *reinterpret_cast<const uint2*>(p + e);
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
      return make_float4(a.x, a.y, b.x, b.y);
    } else {
      return *reinterpret_cast<const float4*>(p + e);
    }
  }
};

// A q4 (Q4 = true) or q8 region; groups of 1 << shift elements along the last dimension, which the
// launchers only build for power-of-two groups (every group ParseKvType picks).
template <bool Q4>
struct QuantKv {
  uint8_t* values;
  __half* scales;
  __half* mins;  // q4 only
  int shift;
  __device__ __forceinline__ float at(int64_t e) const {
    const float s = __half2float(scales[e >> shift]);
    if constexpr (Q4) {
      const uint8_t b = values[e >> 1];
      const float q = static_cast<float>((e & 1) ? (b >> 4) : (b & 0xF));
      return __fadd_rn(__fmul_rn(q, s), __half2float(mins[e >> shift]));
    } else {
      return __fmul_rn(static_cast<float>(static_cast<int8_t>(values[e])), s);
    }
  }
  // e even: both elements sit in one group (groups are even) and, for q4, in one byte.
  __device__ __forceinline__ float2 at2(int64_t e) const {
    const float s = __half2float(scales[e >> shift]);
    if constexpr (Q4) {
      const uint8_t b = values[e >> 1];
      const float m = __half2float(mins[e >> shift]);
      return make_float2(__fadd_rn(__fmul_rn(static_cast<float>(b & 0xF), s), m),
                         __fadd_rn(__fmul_rn(static_cast<float>(b >> 4), s), m));
    } else {
      const char2 c = *reinterpret_cast<const char2*>(values + e);
      return make_float2(__fmul_rn(static_cast<float>(c.x), s), __fmul_rn(static_cast<float>(c.y), s));
    }
  }
  __device__ __forceinline__ float4 at4(int64_t e) const {
    const float2 a = at2(e), b = at2(e + 2);
    return make_float4(a.x, a.y, b.x, b.y);
  }
};

template <typename C>
struct IsQuantKv : std::false_type {};
template <bool Q4>
struct IsQuantKv<QuantKv<Q4>> : std::true_type {};

// Quantizes the g floats x[0..g) (g = 1 << shift) as group `gi` of the region whose element e0 is
// x[0] (e0 a multiple of g): writes the group's codes, scale and (q4) minimum. One thread per group.
template <bool Q4, typename Load>
__device__ void QuantizeKvGroup(const QuantKv<Q4>& c, int64_t e0, Load&& x) {
  const int g = 1 << c.shift;
  const int64_t gi = e0 >> c.shift;
  if constexpr (Q4) {
    float mn = x(0), mx = mn;
    for (int i = 1; i < g; ++i) {
      const float v = x(i);
      mn = v < mn ? v : mn;  // std::min / std::max, signed zeros included
      mx = mx < v ? v : mx;
    }
    const __half s16 = __float2half_rn(__fdiv_rn(__fsub_rn(mx, mn), 15.0f)), m16 = __float2half_rn(mn);
    const float s = __half2float(s16), m = __half2float(m16);
    c.scales[gi] = s16;
    c.mins[gi] = m16;
    for (int i = 0; i < g; i += 2) {
      uint8_t b = 0;
      for (int k = 0; k < 2; ++k) {
        const float q = s > 0.0f ? rintf(__fdiv_rn(__fsub_rn(x(i + k), m), s)) : 0.0f;
        const uint8_t qi = static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), 15.0f));
        b |= static_cast<uint8_t>(k == 0 ? qi : qi << 4);
      }
      c.values[(e0 + i) >> 1] = b;
    }
  } else {
    float amax = 0.0f;
    for (int i = 0; i < g; ++i) {
      const float a = fabsf(x(i));
      amax = amax < a ? a : amax;
    }
    const __half s16 = __float2half_rn(__fdiv_rn(amax, 127.0f));
    const float s = __half2float(s16);
    c.scales[gi] = s16;
    for (int i = 0; i < g; ++i) {
      const float q = s > 0.0f ? rintf(__fdiv_rn(x(i), s)) : 0.0f;
      c.values[e0 + i] = static_cast<uint8_t>(static_cast<int8_t>(fminf(fmaxf(q, -128.0f), 127.0f)));
    }
  }
}

}  // namespace ferry::kernels::cuda
