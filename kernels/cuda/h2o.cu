// H2O's bookkeeping kernels of the CUDA backend (the slot state per sequence and KV head, run where
// the slots live, no host round trip per step): placing new tokens, updating scores and evicting
// after each decode step, and the prefill selection. The slot caches' writes and attention are in
// attention.cu.
#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

// One thread per (token, head): the same rule as the CPU twin, over the (sequence, head)'s slots.
__global__ void H2OPlaceKernel(const int32_t* __restrict__ seq_ids, const int32_t* __restrict__ positions,
                               int32_t* __restrict__ slot_pos, float* __restrict__ scores, uint8_t* __restrict__ occupied,
                               int32_t* __restrict__ slot_ids, int64_t n, int heads, int slots) {
  const int64_t cell = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (cell >= n * heads) return;
  const int64_t i = cell / heads, h = cell % heads;
  const int64_t base = (static_cast<int64_t>(seq_ids[i]) * heads + h) * slots;
  int free = -1;
  for (int j = 0; j < slots && free < 0; ++j) {
    if (!occupied[base + j]) free = j;
  }
  slot_ids[cell] = free;
  if (free < 0) return;
  slot_pos[base + free] = positions[i];
  scores[base + free] = 0.0f;
  occupied[base + free] = 1;
}

__global__ void H2OUpdateKernel(const int32_t* __restrict__ seq_ids, const int32_t* __restrict__ positions,
                                const float* __restrict__ probs, int32_t* __restrict__ slot_pos, float* __restrict__ scores,
                                uint8_t* __restrict__ occupied, int64_t n, int heads, int slots, int budget, int recent,
                                int protect, int group) {
  const int64_t cell = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (cell >= n * heads) return;
  const int64_t i = cell / heads, h = cell % heads;
  const int64_t base = (static_cast<int64_t>(seq_ids[i]) * heads + h) * slots;
  const float* p = probs + cell * group * slots;  // the group's query heads, [group, slots]
  const int pos = positions[i];
  int count = 0;
  for (int j = 0; j < slots; ++j) {
    if (!occupied[base + j]) continue;
    float sum = p[j];  // in head order, as the CPU twin
    for (int g = 1; g < group; ++g) sum += p[g * slots + j];
    scores[base + j] += sum;
    ++count;
  }
  if (count <= budget) return;
  int victim = -1;
  float best = 0.0f;
  int best_at = 0;
  for (int j = 0; j < slots; ++j) {
    const int at = slot_pos[base + j];
    if (!occupied[base + j] || at > pos - recent || at < protect) continue;
    const float sc = scores[base + j];
    if (victim < 0 || sc < best || (sc == best && at < best_at)) victim = j, best = sc, best_at = at;
  }
  if (victim < 0) return;  // the cache refuses protect > heavy up front
  occupied[base + victim] = 0;
  slot_pos[base + victim] = -1;
  scores[base + victim] = 0.0f;
}

// H2O's prefill selection, one block per (prompt, head); the CPU twin sorts, this ranks: position
// p of the rest (neither recent nor protected) is kept when fewer than heavy_left rest positions
// beat it (a larger column sum, or an equal one at an older position), which is the same set.
__global__ void H2OPrefillKernel(const float* __restrict__ col_sums, const int32_t* __restrict__ lengths,
                                 const int32_t* __restrict__ rows, int32_t* __restrict__ slot_pos, float* __restrict__ scores,
                                 uint8_t* __restrict__ occupied, int32_t* __restrict__ token_slot, int max_len, int slots,
                                 int heavy, int recent, int protect, int group) {
  extern __shared__ float col[];  // [max_len], then int flags [max_len]
  int* kept = reinterpret_cast<int*>(col + max_len);
  const int u = blockIdx.x, h = blockIdx.y, heads = gridDim.y;  // h: the KV head
  const int len = lengths[u];
  const float* src = col_sums + (static_cast<int64_t>(u) * heads + h) * group * max_len;  // its query heads' sums
  for (int p = threadIdx.x; p < max_len; p += blockDim.x) {
    float c = 0.0f;
    if (p < len) {
      c = src[p];  // in head order, as the CPU twin
      for (int g = 1; g < group; ++g) c += src[static_cast<int64_t>(g) * max_len + p];
    }
    col[p] = c;
  }
  const int64_t base = (static_cast<int64_t>(rows[u]) * heads + h) * slots;
  for (int j = threadIdx.x; j < slots; j += blockDim.x) {
    slot_pos[base + j] = -1;
    scores[base + j] = 0.0f;
    occupied[base + j] = 0;
  }
  __syncthreads();
  const int heavy_left = heavy - min(protect, len);
  const int rest_begin = protect, rest_end = len - recent;  // rest: rest_begin <= p < rest_end
  for (int p = threadIdx.x; p < max_len; p += blockDim.x) {
    int keep = 0;
    if (p < len) {
      if (p >= rest_end || p < rest_begin) {
        keep = 1;
      } else {
        int rank = 0;
        for (int q = rest_begin; q < rest_end && rank < heavy_left; ++q) {
          if (col[q] > col[p] || (col[q] == col[p] && q < p)) ++rank;
        }
        keep = rank < heavy_left;
      }
    }
    kept[p] = keep;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < max_len; p += blockDim.x) {
    int slot = -1;
    if (kept[p]) {
      slot = 0;
      for (int q = 0; q < p; ++q) slot += kept[q];
      slot_pos[base + slot] = p;
      scores[base + slot] = col[p];
      occupied[base + slot] = 1;
    }
    token_slot[(static_cast<int64_t>(u) * max_len + p) * heads + h] = slot;
  }
}

}  // namespace

cudaError_t LaunchH2OPlace(const H2OPlaceArgs& a, cudaStream_t stream) {
  const int64_t n = a.seq_ids.shape[0];
  const int heads = static_cast<int>(a.slot_pos.shape[1]), slots = static_cast<int>(a.slot_pos.shape[2]);
  if (n == 0) return cudaSuccess;
  const int64_t cells = n * heads;
  H2OPlaceKernel<<<static_cast<unsigned>((cells + 127) / 128), 128, 0, stream>>>(
      a.seq_ids.as<const int32_t>(), a.positions.as<const int32_t>(), a.slot_pos.as<int32_t>(), a.scores.as<float>(),
      a.occupied.as<uint8_t>(), a.slot_ids.as<int32_t>(), n, heads, slots);
  return cudaGetLastError();
}

cudaError_t LaunchH2OUpdate(const H2OUpdateArgs& a, cudaStream_t stream) {
  const int64_t n = a.seq_ids.shape[0];
  const int heads = static_cast<int>(a.slot_pos.shape[1]), slots = static_cast<int>(a.slot_pos.shape[2]);
  if (n == 0) return cudaSuccess;
  const int64_t cells = n * heads;
  H2OUpdateKernel<<<static_cast<unsigned>((cells + 127) / 128), 128, 0, stream>>>(
      a.seq_ids.as<const int32_t>(), a.positions.as<const int32_t>(), a.probs.as<const float>(), a.slot_pos.as<int32_t>(),
      a.scores.as<float>(), a.occupied.as<uint8_t>(), n, heads, slots, a.budget, a.recent, a.protect,
      static_cast<int>(a.probs.shape[1] / heads));
  return cudaGetLastError();
}

cudaError_t LaunchH2OPrefill(const H2OPrefillArgs& a, cudaStream_t stream) {
  const int64_t used = a.col_sums.shape[0];
  const int heads = static_cast<int>(a.slot_pos.shape[1]), max_len = static_cast<int>(a.col_sums.shape[2]);  // KV heads
  const int group = static_cast<int>(a.col_sums.shape[1]) / heads;
  if (used == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(max_len) * (sizeof(float) + sizeof(int));
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(H2OPrefillKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  dim3 grid(static_cast<unsigned>(used), static_cast<unsigned>(heads));
  H2OPrefillKernel<<<grid, 256, smem, stream>>>(a.col_sums.as<const float>(), a.lengths.as<const int32_t>(),
                                                a.rows.as<const int32_t>(), a.slot_pos.as<int32_t>(), a.scores.as<float>(),
                                                a.occupied.as<uint8_t>(), a.token_slot.as<int32_t>(), max_len,
                                                static_cast<int>(a.slot_pos.shape[2]), a.heavy, a.recent, a.protect, group);
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
