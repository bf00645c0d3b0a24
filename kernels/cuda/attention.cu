// Attention kernels of the CUDA backend, over KV caches of any type (F32, F16, q8/q4: each kernel
// is written once against kv_cache.cuh's accessors and computes in fp32), and the cache writes.
//
// AttentionKernel: causal attention over the KV cache, one block per (query, head); serves decode
// (one query per sequence, sequences of any lengths in one launch) and any query the tiled kernel
// does not take. Each warp walks a strided subset of the cache entries 0..pos with an online
// softmax (running max, running sum, rescaled accumulator), so no score matrix is ever stored; the
// warps' partial results are merged in shared memory at the end. K is read once; with column sums
// (H2O's prefill scores, computed once per prompt) a second walk over K adds each entry's final
// probability.
//
// PrefillTileKernel: FlashAttention-style prefill on the tensor cores. One block per (tile of up
// to 64 queries of one sequence at consecutive positions, head): Q, then 64-key tiles of K and V,
// are rounded to fp16 in shared memory; S = Q K^T and O += P V run as wmma 16x16x16 fp16 products
// with fp32 accumulation; the softmax (running max and sum per query row) is fp32. Each warp owns
// 16 query rows, so between the S, softmax and PV phases only the warp synchronizes.
//
// SlotAttentionKernel: H2O's decode over a (sequence, head)'s slots, returning each slot's
// probability from the same pass: the raw scores go to `probs` as they are computed and are
// normalized in place at the end (a pass over slots floats, not over K).
#include <mma.h>

#include <cuda_fp16.h>

#include <cfloat>
#include <type_traits>

#include "kernels/cuda/kv_cache.cuh"
#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

// Token rows given to the slot writes are F32 or F16; dense slots are written as F32 or F16.
__device__ __forceinline__ float Ld(const float* p) { return *p; }
__device__ __forceinline__ float Ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void St(float* p, float v) { *p = v; }
__device__ __forceinline__ void St(__half* p, float v) { *p = __float2half_rn(v); }

// The head dims a lane holds in its registers qv[r] / acc[r] in the per-query kernels. With Pairs
// (an F16 or q8/q4 cache and an even head_dim) a lane loads two neighbours at once, so each warp
// load covers 128 contiguous bytes of an F16 cache as the F32 path's float loads do (scalar __half
// loads covered 64 and left the F16 cache at half the F32 cache's bandwidth).
template <bool Pairs>
__device__ __forceinline__ int LaneDim(int r, int lane) {
  return Pairs ? 64 * (r >> 1) + 2 * lane + (r & 1) : lane + 32 * r;
}
// Calls f(r, x) for each head dim the lane holds: register r, x = element row + LaneDim(r, lane) of
// the cache C (kv_cache.cuh) in fp32.
template <bool Pairs, typename C, typename F>
__device__ __forceinline__ void ForLaneDims(const C& c, int64_t row, int lane, int hd, F&& f) {
  if constexpr (Pairs) {
#pragma unroll
    for (int r = 0; r < kMaxPerLane; r += 2) {
      const int d = LaneDim<true>(r, lane);
      if (d < hd) {
        const float2 x = c.at2(row + d);
        f(r, x.x);
        f(r + 1, x.y);
      }
    }
  } else {
#pragma unroll
    for (int r = 0; r < kMaxPerLane; ++r) {
      const int d = LaneDim<false>(r, lane);
      if (d < hd) f(r, c.at(row + d));
    }
  }
}
// The lane's part of q . row.
template <bool Pairs, typename C>
__device__ __forceinline__ float LaneDot(const float (&qv)[kMaxPerLane], const C& c, int64_t row, int lane, int hd) {
  float s = 0.0f;
  ForLaneDims<Pairs>(c, row, lane, hd, [&](int r, float x) { s += qv[r] * x; });
  return s;
}
// acc = acc * corr + p * row, over the lane's dims.
template <bool Pairs, typename C>
__device__ __forceinline__ void LaneAxpy(float (&acc)[kMaxPerLane], float corr, float p, const C& c, int64_t row, int lane,
                                         int hd) {
  ForLaneDims<Pairs>(c, row, lane, hd, [&](int r, float x) { acc[r] = acc[r] * corr + p * x; });
}

// Merges the warps' (max, sum, acc) partials; returns the final max and sum (valid in every thread)
// and leaves the merged, normalized output row in `o` (head_dim floats, global memory).
struct Merged {
  float max, sum;
};
template <bool Pairs>
__device__ Merged MergeWarps(float m, float l, const float (&acc)[kMaxPerLane], int head_dim, float* o) {
  __shared__ float s_max[kWarps], s_sum[kWarps];
  __shared__ float s_acc[kWarps][kMaxPerLane * 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_max[warp] = m;
    s_sum[warp] = l;
  }
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) s_acc[warp][LaneDim<Pairs>(r, lane)] = acc[r];
  __syncthreads();
  float gmax = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w) gmax = fmaxf(gmax, s_max[w]);
  float total = 0.0f;
  float weight[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = s_sum[w] > 0.0f ? expf(s_max[w] - gmax) : 0.0f;
    total += s_sum[w] * weight[w];
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float v = 0.0f;
    for (int w = 0; w < kWarps; ++w) v += s_acc[w][d] * weight[w];
    o[d] = v * inv;
  }
  return {gmax, total};
}

template <typename C, bool Pairs>
__global__ void AttentionKernel(const float* __restrict__ q, const C k_cache, const C v_cache,
                                const int32_t* __restrict__ seq_ids,
                                const int32_t* __restrict__ positions, const int32_t* __restrict__ rows,
                                float* __restrict__ out, float* __restrict__ col_sums, int64_t max_len, int64_t width,
                                int64_t kv_width, int group, int head_dim, float scale) {
  const int64_t i = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
  const int h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t len = static_cast<int64_t>(positions[i]) + 1;
  const int64_t seq = seq_ids[i];
  const int64_t base = seq * max_len * kv_width + static_cast<int64_t>(h / group) * head_dim;  // the query group's KV head

  float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    const int d = LaneDim<Pairs>(r, lane);
    qv[r] = d < head_dim ? q[i * width + static_cast<int64_t>(h) * head_dim + d] : 0.0f;
    acc[r] = 0.0f;
  }
  auto score = [&](int64_t j) {
    float s = LaneDot<Pairs>(qv, k_cache, base + j * kv_width, lane, head_dim);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s * scale;
  };
  float m = -FLT_MAX, l = 0.0f;
  for (int64_t j = warp; j < len; j += kWarps) {
    const float s = score(j);
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * corr + p;
    LaneAxpy<Pairs>(acc, corr, p, v_cache, base + j * kv_width, lane, head_dim);
    m = m_new;
  }
  const Merged fin = MergeWarps<Pairs>(m, l, acc, head_dim, out + i * width + static_cast<int64_t>(h) * head_dim);
  if (col_sums == nullptr) return;
  float* col = col_sums + (seq * gridDim.y + h) * max_len;
  const float inv = 1.0f / fin.sum;
  for (int64_t j = warp; j < len; j += kWarps) {
    const float p = expf(score(j) - fin.max) * inv;
    if (lane == 0) atomicAdd(col + j, p);
  }
}

// ---- Tensor-core prefill -------------------------------------------------------------------------

constexpr int kTile = 64;         // queries per block and keys per step
constexpr int kLdP = kTile + 8;   // halves
constexpr int kLdS = kTile + 4;   // floats

size_t TileSmemBytes(int head_dim) {
  const size_t ldh = head_dim + 8, ldo = head_dim + 4;
  return 3 * kTile * ldh * sizeof(__half) + kTile * kLdP * sizeof(__half) + kTile * kLdS * sizeof(float) +
         kTile * ldo * sizeof(float) + 2 * kTile * sizeof(float);
}

// With kColSums, a first walk over the key tiles finds each query row's final max and sum (S only,
// no V), and the second adds each key's normalized probability, summed over the tile's queries, to
// col_sums[seq, head, key] (H2O's prefill scores): K is read twice, V once.
template <bool kColSums, typename C>
__global__ void __launch_bounds__(kWarps * 32) PrefillTileKernel(
    const float* __restrict__ q, const C k_cache, const C v_cache,
    const int32_t* __restrict__ seq_ids, const int32_t* __restrict__ positions, const int2* __restrict__ tiles,
    float* __restrict__ out, float* __restrict__ col_sums, int64_t max_len, int64_t width, int64_t kv_width, int group, int hd,
    float scale) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  const int ldh = hd + 8, ldo = hd + 4;
  __half* qs = reinterpret_cast<__half*>(smem);
  __half* ks = qs + kTile * ldh;
  __half* vs = ks + kTile * ldh;
  __half* ps = vs + kTile * ldh;
  float* ss = reinterpret_cast<float*>(ps + kTile * kLdP);
  float* os = ss + kTile * kLdS;
  float* row_m = os + kTile * ldo;
  float* row_l = row_m + kTile;

  const int2 tile = tiles[blockIdx.x];
  const int64_t r0 = tile.x;
  const int nrows = tile.y;
  const int h = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int p0 = positions[r0], p_last = p0 + nrows - 1;
  const int64_t seq = seq_ids[r0];
  const int64_t base = seq * max_len * kv_width + static_cast<int64_t>(h / group) * hd;  // the query group's KV head
  const int64_t col0 = static_cast<int64_t>(h) * hd;

  // Rows of Q, K and V move as float4 (head_dim % 16 == 0 keeps them 16-byte aligned) and land
  // in shared memory as pairs of halves.
  const int hd4 = hd / 4;
  const float4 zero4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  auto put = [](__half* dst, float4 v) {
    __half2* d2 = reinterpret_cast<__half2*>(dst);
    d2[0] = __floats2half2_rn(v.x, v.y);
    d2[1] = __floats2half2_rn(v.z, v.w);
  };
  for (int idx = tid; idx < kTile * hd4; idx += blockDim.x) {
    const int r = idx / hd4, d = (idx - r * hd4) * 4;
    float4 v = r < nrows ? *reinterpret_cast<const float4*>(q + (r0 + r) * width + col0 + d) : zero4;
    v.x *= scale, v.y *= scale, v.z *= scale, v.w *= scale;
    put(qs + r * ldh + d, v);
    *reinterpret_cast<float4*>(os + r * ldo + d) = zero4;
  }
  if (tid < kTile) {
    row_m[tid] = -FLT_MAX;
    row_l[tid] = 0.0f;
  }
  // Loads keys kt..kt+63 (and values) as fp16; entries after p_last may hold anything (NaN
  // included) and are never read: zeros instead.
  auto load_tile = [&](int kt, bool with_v) {
    for (int idx = tid; idx < kTile * hd4; idx += blockDim.x) {
      const int j = idx / hd4, d = (idx - j * hd4) * 4;
      const int key = kt + j;
      const bool in = key <= p_last;
      const int64_t at = base + static_cast<int64_t>(key) * kv_width + d;
      put(ks + j * ldh + d, in ? k_cache.at4(at) : zero4);
      if (with_v) put(vs + j * ldh + d, in ? v_cache.at4(at) : zero4);
    }
  };
  // S = Q K^T for this warp's 16 rows, into ss.
  auto scores = [&]() {
    for (int ct = 0; ct < kTile / 16; ++ct) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < hd; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
        wmma::load_matrix_sync(a, qs + warp * 16 * ldh + kk, ldh);
        wmma::load_matrix_sync(b, ks + ct * 16 * ldh + kk, ldh);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(ss + warp * 16 * kLdS + ct * 16, acc, kLdS, wmma::mem_row_major);
    }
    __syncwarp();
  };
  // Two lanes per query row, 32 keys each.
  const int r = warp * 16 + lane / 2, c0 = (lane % 2) * (kTile / 2);
  const int pos_r = p0 + r;
  const int num_kt = (p_last + kTile) / kTile;
  __syncthreads();

  if (kColSums) {
    for (int t = 0; t < num_kt; ++t) {
      const int kt = t * kTile;
      load_tile(kt, false);
      __syncthreads();
      scores();
      const float* srow = ss + r * kLdS;
      float mx = -FLT_MAX;
      for (int c = c0; c < c0 + kTile / 2; ++c) {
        if (kt + c <= pos_r) mx = fmaxf(mx, srow[c]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = row_m[r], m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int c = c0; c < c0 + kTile / 2; ++c) {
        if (kt + c <= pos_r) sum += __half2float(__float2half_rn(expf(srow[c] - m_new)));
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float l_old = row_l[r];
      __syncwarp();
      if (lane % 2 == 0) {
        row_m[r] = m_new;
        row_l[r] = l_old * expf(m_old - m_new) + sum;
      }
      __syncthreads();  // every warp is done with ks
    }
  }

  for (int t = 0; t < num_kt; ++t) {
    const int kt = t * kTile;
    load_tile(kt, true);
    __syncthreads();
    scores();
    {
      float* srow = ss + r * kLdS;
      const float m_old = row_m[r];
      float m_new = m_old, corr = 1.0f;
      if (!kColSums) {  // online: the max so far
        float mx = -FLT_MAX;
        for (int c = c0; c < c0 + kTile / 2; ++c) {
          if (kt + c <= pos_r) mx = fmaxf(mx, srow[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        m_new = fmaxf(m_old, mx);
        corr = expf(m_old - m_new);
      }
      const float inv_l = kColSums && r < nrows ? 1.0f / row_l[r] : 0.0f;
      float sum = 0.0f;
      for (int c = c0; c < c0 + kTile / 2; ++c) {
        const __half p = __float2half_rn(kt + c <= pos_r ? expf(srow[c] - m_new) : 0.0f);
        ps[r * kLdP + c] = p;
        sum += __half2float(p);
        if (kColSums) srow[c] = __half2float(p) * inv_l;  // this query's probability of key kt + c
      }
      if (!kColSums) {
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        const int d0 = (lane % 2) * (hd / 2);
        for (int d = d0; d < d0 + hd / 2; ++d) os[r * ldo + d] *= corr;
        const float l_old = row_l[r];
        __syncwarp();
        if (lane % 2 == 0) {
          row_m[r] = m_new;
          row_l[r] = l_old * corr + sum;
        }
      }
    }
    __syncwarp();
    // O += P V for this warp's 16 rows.
    for (int dt = 0; dt < hd / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, os + warp * 16 * ldo + dt * 16, ldo, wmma::mem_row_major);
      for (int kk = 0; kk < kTile; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
        wmma::load_matrix_sync(a, ps + warp * 16 * kLdP + kk, kLdP);
        wmma::load_matrix_sync(b, vs + kk * ldh + dt * 16, ldh);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(os + warp * 16 * ldo + dt * 16, acc, ldo, wmma::mem_row_major);
    }
    if (kColSums) {
      __syncthreads();  // every warp's probabilities are in ss
      if (tid < kTile && kt + tid <= p_last) {
        float c = 0.0f;
        for (int rr = 0; rr < nrows; ++rr) c += ss[rr * kLdS + tid];
        atomicAdd(col_sums + (seq * gridDim.y + h) * max_len + kt + tid, c);
      }
    }
    __syncthreads();  // every warp is done with ks, vs and ss
  }
  for (int idx = tid; idx < nrows * hd; idx += blockDim.x) {
    const int rr = idx / hd, d = idx - rr * hd;
    out[(r0 + rr) * width + col0 + d] = os[rr * ldo + d] / row_l[rr];
  }
}

// ---- H2O slots -----------------------------------------------------------------------------------

// Block (token i, KV head h) of the slot writes: the first element of its slot in the cache and of
// its head in the token's row; false where the token's head is not stored (slot -1).
__device__ __forceinline__ bool SlotWriteTarget(const int32_t* __restrict__ seq_ids, const int32_t* __restrict__ slot_ids, int heads,
                                                int slots, int hd, int64_t* cell, int64_t* src) {
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y;
  const int slot = slot_ids[i * heads + h];
  if (slot < 0) return false;
  *cell = ((static_cast<int64_t>(seq_ids[i]) * heads + h) * slots + slot) * hd;
  *src = (i * heads + h) * hd;
  return true;
}

template <typename I, typename T>
__global__ void SlotKvWriteKernel(const I* __restrict__ k, const I* __restrict__ v, T* __restrict__ k_slots,
                                  T* __restrict__ v_slots, const int32_t* __restrict__ seq_ids,
                                  const int32_t* __restrict__ slot_ids, int heads, int slots, int hd) {
  int64_t cell, src;
  if (!SlotWriteTarget(seq_ids, slot_ids, heads, slots, hd, &cell, &src)) return;  // not stored
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    St(k_slots + cell + d, Ld(k + src + d));  // F16 -> F32 exact, F32 -> F16 rounded to nearest
    St(v_slots + cell + d, Ld(v + src + d));
  }
}

// A token's heads into q8/q4 slots: one thread per group of each head.
template <typename I, bool Q4>
__global__ void QuantSlotKvWriteKernel(const I* __restrict__ k, const I* __restrict__ v, QuantKv<Q4> k_slots,
                                       QuantKv<Q4> v_slots, const int32_t* __restrict__ seq_ids,
                                       const int32_t* __restrict__ slot_ids, int heads, int slots, int hd) {
  int64_t cell, src;
  if (!SlotWriteTarget(seq_ids, slot_ids, heads, slots, hd, &cell, &src)) return;  // not stored
  const int g = 1 << k_slots.shift;
  for (int c0 = threadIdx.x * g; c0 < hd; c0 += blockDim.x * g) {
    QuantizeKvGroup(k_slots, cell + c0, [&](int x) { return Ld(k + src + c0 + x); });
    QuantizeKvGroup(v_slots, cell + c0, [&](int x) { return Ld(v + src + c0 + x); });
  }
}

// One block per token: its k and v rows into the cache row (seq, pos); F32 copied, F16 rounded to
// nearest, q8/q4 one thread per group (as the CPU twin, bitwise).
template <typename T>
__global__ void KvWriteKernel(const float* __restrict__ k, const float* __restrict__ v, DenseKv<T> k_cache,
                              DenseKv<T> v_cache, const int32_t* __restrict__ seq, const int32_t* __restrict__ pos,
                              int64_t max_len, int64_t width) {
  const int64_t i = blockIdx.x;
  const int64_t row = (static_cast<int64_t>(seq[i]) * max_len + pos[i]) * width;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    St(k_cache.p + row + j, k[i * width + j]);
    St(v_cache.p + row + j, v[i * width + j]);
  }
}
template <bool Q4>
__global__ void QuantKvWriteKernel(const float* __restrict__ k, const float* __restrict__ v, QuantKv<Q4> k_cache,
                                   QuantKv<Q4> v_cache, const int32_t* __restrict__ seq, const int32_t* __restrict__ pos,
                                   int64_t max_len, int64_t width) {
  const int64_t i = blockIdx.x;
  const int64_t row = (static_cast<int64_t>(seq[i]) * max_len + pos[i]) * width;
  const int64_t g = int64_t{1} << k_cache.shift;
  for (int64_t c0 = threadIdx.x * g; c0 < width; c0 += blockDim.x * g) {
    QuantizeKvGroup(k_cache, row + c0, [&](int x) { return k[i * width + c0 + x]; });
    QuantizeKvGroup(v_cache, row + c0, [&](int x) { return v[i * width + c0 + x]; });
  }
}

template <typename C, bool Pairs>
__global__ void SlotAttentionKernel(const float* __restrict__ q, const C k_slots, const C v_slots,
                                    const uint8_t* __restrict__ occupied,
                                    const int32_t* __restrict__ seq_ids, float* __restrict__ out, float* __restrict__ probs,
                                    int slots, int hd, int kv_heads, float scale) {
  const int64_t i = blockIdx.x;
  const int h = blockIdx.y, heads = gridDim.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t cell = static_cast<int64_t>(seq_ids[i]) * kv_heads + h / (heads / kv_heads);  // (sequence, KV head)
  const uint8_t* occ = occupied + cell * slots;
  const int64_t cell0 = cell * slots * hd;  // the first element of the cell's slots
  float* p_out = probs + (i * heads + h) * slots;
  const int64_t width = static_cast<int64_t>(heads) * hd;
  float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    const int d = LaneDim<Pairs>(r, lane);
    qv[r] = d < hd ? q[i * width + static_cast<int64_t>(h) * hd + d] : 0.0f;
    acc[r] = 0.0f;
  }
  float m = -FLT_MAX, l = 0.0f;
  for (int j = warp; j < slots; j += kWarps) {
    if (!occ[j]) continue;  // uniform across the warp
    float s = LaneDot<Pairs>(qv, k_slots, cell0 + static_cast<int64_t>(j) * hd, lane, hd);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= scale;
    if (lane == 0) p_out[j] = s;  // the raw score, normalized below
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * corr + p;
    LaneAxpy<Pairs>(acc, corr, p, v_slots, cell0 + static_cast<int64_t>(j) * hd, lane, hd);
    m = m_new;
  }
  const Merged fin = MergeWarps<Pairs>(m, l, acc, hd, out + i * width + static_cast<int64_t>(h) * hd);
  __syncthreads();  // the raw scores written by every warp are visible
  const float inv = fin.sum > 0.0f ? 1.0f / fin.sum : 0.0f;
  for (int j = threadIdx.x; j < slots; j += blockDim.x) p_out[j] = occ[j] ? expf(p_out[j] - fin.max) * inv : 0.0f;
}

}  // namespace

// The F16 per-query kernels load __half2 pairs where the head_dim is even and the caches 4-byte
// aligned, scalar halves elsewhere.
static bool HalfPairsAligned(const void* k, const void* v, int head_dim) {
  return head_dim % 2 == 0 && reinterpret_cast<uintptr_t>(k) % 4 == 0 && reinterpret_cast<uintptr_t>(v) % 4 == 0;
}

template <bool Q4>
static QuantKv<Q4> QuantView(const TensorView& t) {
  const QuantLayout l = KvQuantLayout(t);
  uint8_t* b = static_cast<uint8_t*>(t.data);
  int shift = 0;
  while ((1 << shift) < t.quant->group) ++shift;
  return {b, reinterpret_cast<__half*>(b + l.scales_offset), reinterpret_cast<__half*>(b + l.mins_offset), shift};
}

bool KvTypeSupported(const TensorView& cache) {
  if (!cache.quant) return cache.dtype == DType::kF32 || cache.dtype == DType::kF16;
  const int g = cache.quant->group;
  return g >= 2 && (g & (g - 1)) == 0;
}

// Calls f(k accessor, v accessor, std::bool_constant<Pairs>) for the caches' type (kv_cache.cuh):
// q8/q4 caches always read pairs (their groups are even and within a head, so heads are even).
template <typename F>
static void DispatchKv(const TensorView& k, const TensorView& v, int head_dim, F&& f) {
  if (k.quant && k.quant->kind == QuantKind::kQ4) {
    f(QuantView<true>(k), QuantView<true>(v), std::true_type{});
  } else if (k.quant) {
    f(QuantView<false>(k), QuantView<false>(v), std::true_type{});
  } else if (k.dtype == DType::kF16) {
    const DenseKv<__half> kc{static_cast<__half*>(k.data)}, vc{static_cast<__half*>(v.data)};
    if (HalfPairsAligned(k.data, v.data, head_dim)) {
      f(kc, vc, std::true_type{});
    } else {
      f(kc, vc, std::false_type{});
    }
  } else {
    f(DenseKv<float>{static_cast<float*>(k.data)}, DenseKv<float>{static_cast<float*>(v.data)}, std::false_type{});
  }
}

cudaError_t LaunchKvWrite(const KvWriteArgs& a, cudaStream_t stream) {
  const int64_t n = a.k.shape[0];
  if (n == 0) return cudaSuccess;
  const int64_t max_len = a.k_cache.shape[1], width = a.k_cache.shape[2];
  DispatchKv(a.k_cache, a.v_cache, 2, [&](auto kc, auto vc, auto) {
    if constexpr (IsQuantKv<decltype(kc)>::value) {
      QuantKvWriteKernel<<<n, 128, 0, stream>>>(a.k.as<const float>(), a.v.as<const float>(), kc, vc, a.seq_ids.as<const int32_t>(),
                                                a.positions.as<const int32_t>(), max_len, width);
    } else {
      KvWriteKernel<<<n, 256, 0, stream>>>(a.k.as<const float>(), a.v.as<const float>(), kc, vc, a.seq_ids.as<const int32_t>(),
                                           a.positions.as<const int32_t>(), max_len, width);
    }
  });
  return cudaGetLastError();
}

bool PrefillTilesSupported(int head_dim) { return head_dim % 16 == 0 && head_dim <= 128; }

cudaError_t LaunchAttention(const AttentionArgs& a, const int32_t* rows, int64_t num_rows, cudaStream_t stream) {
  const int64_t width = a.q.shape[1], kv_width = a.k_cache.shape[2];
  const int head_dim = static_cast<int>(width / a.num_heads), group = a.num_heads / a.kv_heads();
  if (head_dim > kMaxPerLane * 32) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(num_rows), static_cast<unsigned>(a.num_heads));
  DispatchKv(a.k_cache, a.v_cache, head_dim, [&](auto kc, auto vc, auto pairs) {
    AttentionKernel<decltype(kc), decltype(pairs)::value><<<grid, kWarps * 32, 0, stream>>>(
        a.q.as<const float>(), kc, vc, a.seq_ids.as<const int32_t>(), a.positions.as<const int32_t>(), rows, a.out.as<float>(),
        a.col_sums.data != nullptr ? a.col_sums.as<float>() : nullptr, a.k_cache.shape[1], width, kv_width, group, head_dim,
        a.scale);
  });
  return cudaGetLastError();
}

cudaError_t LaunchPrefillTiles(const AttentionArgs& a, const int2* tiles, int64_t num_tiles, cudaStream_t stream) {
  const int64_t width = a.q.shape[1], kv_width = a.k_cache.shape[2];
  const int head_dim = static_cast<int>(width / a.num_heads), group = a.num_heads / a.kv_heads();
  if (!PrefillTilesSupported(head_dim)) return cudaErrorInvalidValue;
  if (num_tiles == 0) return cudaSuccess;
  const size_t smem = TileSmemBytes(head_dim);
  const bool cols = a.col_sums.data != nullptr;
  dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(a.num_heads));
  cudaError_t e = cudaSuccess;
  DispatchKv(a.k_cache, a.v_cache, head_dim, [&](auto kc, auto vc, auto) {
    using C = decltype(kc);
    auto kernel = cols ? PrefillTileKernel<true, C> : PrefillTileKernel<false, C>;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return;
    kernel<<<grid, kWarps * 32, smem, stream>>>(a.q.as<const float>(), kc, vc, a.seq_ids.as<const int32_t>(),
                                                a.positions.as<const int32_t>(), tiles, a.out.as<float>(),
                                                cols ? a.col_sums.as<float>() : nullptr, a.k_cache.shape[1], width, kv_width,
                                                group, head_dim, a.scale);
    e = cudaGetLastError();
  });
  return e;
}

cudaError_t LaunchSlotKvWrite(const SlotKvWriteArgs& a, cudaStream_t stream) {
  const int64_t n = a.k.shape[0];
  if (n == 0) return cudaSuccess;
  const int heads = static_cast<int>(a.k_slots.shape[1]), slots = static_cast<int>(a.k_slots.shape[2]),
            hd = static_cast<int>(a.k_slots.shape[3]);
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(heads));
  auto launch = [&](auto* in_type, auto* slot_type) {
    using I = std::remove_pointer_t<decltype(in_type)>;
    using T = std::remove_pointer_t<decltype(slot_type)>;
    SlotKvWriteKernel<I, T><<<grid, 128, 0, stream>>>(a.k.as<const I>(), a.v.as<const I>(), a.k_slots.as<T>(), a.v_slots.as<T>(),
                                                      a.seq_ids.as<const int32_t>(), a.slot_ids.as<const int32_t>(), heads,
                                                      slots, hd);
  };
  const bool in16 = a.k.dtype == DType::kF16, out16 = a.k_slots.dtype == DType::kF16;
  if (a.k_slots.quant) {
    DispatchKv(a.k_slots, a.v_slots, hd, [&](auto kc, auto vc, auto) {
      if constexpr (IsQuantKv<decltype(kc)>::value) {
        if (in16) {
          QuantSlotKvWriteKernel<<<grid, 32, 0, stream>>>(a.k.as<const __half>(), a.v.as<const __half>(), kc, vc,
                                                          a.seq_ids.as<const int32_t>(), a.slot_ids.as<const int32_t>(), heads,
                                                          slots, hd);
        } else {
          QuantSlotKvWriteKernel<<<grid, 32, 0, stream>>>(a.k.as<const float>(), a.v.as<const float>(), kc, vc,
                                                          a.seq_ids.as<const int32_t>(), a.slot_ids.as<const int32_t>(), heads,
                                                          slots, hd);
        }
      }
    });
    return cudaGetLastError();
  }
  __half* h = nullptr;
  float* f = nullptr;
  if (in16 && out16) {
    launch(h, h);
  } else if (in16) {
    launch(h, f);
  } else if (out16) {
    launch(f, h);
  } else {
    launch(f, f);
  }
  return cudaGetLastError();
}

cudaError_t LaunchSlotAttention(const SlotAttentionArgs& a, cudaStream_t stream) {
  const int64_t n = a.q.shape[0];
  const int kv_heads = static_cast<int>(a.k_slots.shape[1]), slots = static_cast<int>(a.k_slots.shape[2]),
            hd = static_cast<int>(a.k_slots.shape[3]);
  const int heads = static_cast<int>(a.q.shape[1] / hd);  // query heads
  if (hd > kMaxPerLane * 32) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(heads));
  DispatchKv(a.k_slots, a.v_slots, hd, [&](auto kc, auto vc, auto pairs) {
    SlotAttentionKernel<decltype(kc), decltype(pairs)::value><<<grid, kWarps * 32, 0, stream>>>(
        a.q.as<const float>(), kc, vc, a.occupied.as<const uint8_t>(), a.seq_ids.as<const int32_t>(), a.out.as<float>(),
        a.probs.as<float>(), slots, hd, kv_heads, a.scale);
  });
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
