// CPU linear: out[t, m] = dot(in[t, :], weight[m, :]) + bias[m] (then ReLU), fp32 compute; the
// weight may be F32, F16, BF16 or group-wise q4/q8 (dequantized with the rest of the conversion).
// Work is a fixed grid of (token block, weight-row block) tasks; each task converts its weight
// rows to fp32 once into a per-thread scratch and computes register tiles of kTileT tokens x
// kTileM rows. Every output element is the same 8-lane dot product reduced in the same order
// whatever the tile or batch size, so the result of a token never depends on the batch.
#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <vector>

#include "base/quant.h"
#include "base/thread_pool.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::kernels {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
using V8 = __m256;
inline V8 Zero() { return _mm256_setzero_ps(); }
inline V8 Load(const float* p) { return _mm256_loadu_ps(p); }
inline V8 Fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }
inline float Lane(V8 v, int i) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  return f[i];
}
#else
typedef float V8 __attribute__((vector_size(32), aligned(4)));
inline V8 Zero() { return V8{}; }
inline V8 Load(const float* p) {
  V8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline V8 Fma(V8 a, V8 b, V8 c) { return a * b + c; }  // -ffp-contract=off keeps this two ops
inline float Lane(V8 v, int i) { return v[i]; }
#endif

constexpr int64_t kTileT = 4;
constexpr int64_t kTileM = 2;
constexpr int64_t kTokenBlock = 64;

inline float Reduce(V8 v) {
  // Fixed pairwise order.
  const float a = (Lane(v, 0) + Lane(v, 4)) + (Lane(v, 2) + Lane(v, 6));
  const float b = (Lane(v, 1) + Lane(v, 5)) + (Lane(v, 3) + Lane(v, 7));
  return a + b;
}

// Computes a TT x MM tile of dot products of length k. Every element goes through the same
// lane-wise FMA chain and the same reduction, whatever TT and MM are.
template <int TT, int MM>
[[gnu::always_inline]] inline void Tile(const float* const* x, const float* const* w, int64_t k,
                                        float out[kTileT][kTileM]) {
  V8 acc[TT][MM];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) acc[t][m] = Zero();
  const int64_t k8 = k / 8 * 8;
  for (int64_t j = 0; j < k8; j += 8) {
    V8 wv[MM];
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) wv[m] = Load(w[m] + j);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const V8 xv = Load(x[t] + j);
#pragma GCC unroll 8
      for (int m = 0; m < MM; ++m) acc[t][m] = Fma(xv, wv[m], acc[t][m]);
    }
  }
  for (int t = 0; t < TT; ++t) {
    for (int m = 0; m < MM; ++m) {
      float tail = 0.0f;
      for (int64_t j = k8; j < k; ++j) tail += x[t][j] * w[m][j];
      out[t][m] = Reduce(acc[t][m]) + tail;
    }
  }
}

void TileDispatch(int tt, int mm, const float* const* x, const float* const* w, int64_t k,
                  float out[kTileT][kTileM]) {
  switch (tt * 10 + mm) {
    case 42: Tile<4, 2>(x, w, k, out); return;
    case 41: Tile<4, 1>(x, w, k, out); return;
    case 32: Tile<3, 2>(x, w, k, out); return;
    case 31: Tile<3, 1>(x, w, k, out); return;
    case 22: Tile<2, 2>(x, w, k, out); return;
    case 21: Tile<2, 1>(x, w, k, out); return;
    case 12: Tile<1, 2>(x, w, k, out); return;
    default: Tile<1, 1>(x, w, k, out); return;
  }
}

}  // namespace

void CpuLinear(ThreadPool& pool, const LinearArgs& a) {
  const int64_t n = a.in.shape[0], k = a.in.shape[1], m_total = a.weight.shape[0];
  // Weight rows per task: keep the converted block near 128 KiB.
  const int64_t row_block = std::max<int64_t>(kTileM, std::min<int64_t>(64, (32768 / std::max<int64_t>(k, 1)) / kTileM * kTileM));
  const int64_t m_blocks = (m_total + row_block - 1) / row_block;
  const int64_t t_blocks = (n + kTokenBlock - 1) / kTokenBlock;
  const size_t wsize = DTypeSize(a.weight.dtype);
  QuantLayout qlayout;
  if (a.weight.quant) qlayout = *LayoutQuantized(*a.weight.quant, m_total, k);  // ValidateLinear checked it
  const float* bias = a.bias.data != nullptr ? a.bias.as<const float>() : nullptr;

  pool.ParallelFor(m_blocks * t_blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    thread_local std::vector<float> scratch;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t mb = task % m_blocks, tb = task / m_blocks;
      const int64_t m0 = mb * row_block, m1 = std::min(m_total, m0 + row_block);
      const int64_t t0 = tb * kTokenBlock, t1 = std::min(n, t0 + kTokenBlock);
      const float* wrows;
      if (a.weight.quant) {
        // Quantized rows are dequantized here, once per task, into the same fp32 scratch.
        scratch.resize(static_cast<size_t>((m1 - m0) * k));
        DequantizeRows(*a.weight.quant, qlayout, a.weight.as<const uint8_t>(), k, m0, m1 - m0, scratch.data());
        wrows = scratch.data();
      } else if (a.weight.dtype == DType::kF32) {
        wrows = a.weight.as<const float>() + m0 * k;
      } else {
        scratch.resize(static_cast<size_t>((m1 - m0) * k));
        ConvertToF32(a.weight.dtype, a.weight.as<const char>() + static_cast<size_t>(m0 * k) * wsize, scratch.data(),
                     scratch.size());
        wrows = scratch.data();
      }
      for (int64_t t = t0; t < t1; t += kTileT) {
        const int tt = static_cast<int>(std::min(kTileT, t1 - t));
        const float* x[kTileT];
        for (int i = 0; i < tt; ++i) x[i] = a.in.as<const float>() + (t + i) * k;
        for (int64_t m = m0; m < m1; m += kTileM) {
          const int mm = static_cast<int>(std::min(kTileM, m1 - m));
          const float* w[kTileM];
          for (int i = 0; i < mm; ++i) w[i] = wrows + (m - m0 + i) * k;
          float tile[kTileT][kTileM];
          TileDispatch(tt, mm, x, w, k, tile);
          for (int i = 0; i < tt; ++i) {
            float* y = a.out.as<float>() + (t + i) * m_total + m;
            for (int j = 0; j < mm; ++j) {
              float v = tile[i][j] + (bias != nullptr ? bias[m + j] : 0.0f);
              if (a.relu && v < 0.0f) v = 0.0f;
              y[j] = v;
            }
          }
        }
      }
    }
  });
}

}  // namespace ferry::kernels
