// Sampling on the GPU by the rule of kernels/sampling.h: each row's logits are sorted descending
// with their ids (CUB's segmented radix sort, stable, so ties keep the lower id first, as the CPU
// sorts), then one block per row turns the first `keep` into probabilities in double, scans them,
// applies top-p and picks the first candidate whose cumulative mass exceeds u x the mass. The
// scan adds in another order than the CPU's loop, so a draw within ~1e-16 of a boundary may pick
// the neighbour; otherwise the tokens are the CPU's.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cfloat>
#include <climits>

#include "kernels/cuda/launch.h"

namespace ferry::kernels::cuda {
namespace {

constexpr int kThreads = 512;

struct MinOp {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

unsigned Blocks(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535)); }

__global__ void IotaRowsKernel(int32_t* ids, int32_t* offsets, int64_t rows, int64_t vocab) {
  const int64_t n = rows * vocab;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ids[i] = static_cast<int32_t>(i % vocab);
  }
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r <= rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    offsets[r] = static_cast<int32_t>(r * vocab);
  }
}

// sorted/ids: [rows, vocab] descending; cum: [rows, vocab] scratch.
__global__ void __launch_bounds__(kThreads) PickKernel(const float* __restrict__ sorted, const int32_t* __restrict__ ids,
                                                       double* __restrict__ cum, const double* __restrict__ uniforms,
                                                       int32_t* __restrict__ out, int64_t vocab, int keep, float temperature,
                                                       float top_p) {
  using Scan = cub::BlockScan<double, kThreads>;
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Reduce::TempStorage reduce_storage;
  __shared__ double carry;
  __shared__ int found;
  const int64_t row = blockIdx.x;
  const float* l = sorted + row * vocab;
  double* c = cum + row * vocab;
  const double max_logit = l[0];
  if (threadIdx.x == 0) carry = 0.0;
  __syncthreads();
  for (int t = 0; t < keep; t += kThreads) {
    const int i = t + threadIdx.x;
    const double p = i < keep ? exp((static_cast<double>(l[i]) - max_logit) / temperature) : 0.0;
    double inclusive, tile_total;
    Scan(scan_storage).InclusiveSum(p, inclusive, tile_total);
    if (i < keep) c[i] = carry + inclusive;
    __syncthreads();
    if (threadIdx.x == 0) carry += tile_total;
    __syncthreads();
  }
  const double total = carry;
  // The smallest index whose cumulative mass satisfies `pred`, or `fallback`.
  auto first = [&](auto pred, int limit, int fallback) {
    int best = INT_MAX;
    for (int i = threadIdx.x; i < limit; i += kThreads) {
      if (pred(c[i])) {
        best = i;
        break;  // i only grows for this thread
      }
    }
    const int m = Reduce(reduce_storage).Reduce(best, MinOp());
    if (threadIdx.x == 0) found = m == INT_MAX ? fallback : m;
    __syncthreads();
    const int result = found;
    __syncthreads();
    return result;
  };
  int cut = keep;
  if (top_p < 1.0f) cut = first([&](double v) { return v / total >= static_cast<double>(top_p); }, keep, keep - 1) + 1;
  const double mass = c[cut - 1];
  const double target = uniforms[row] * mass;
  const int pick = first([&](double v) { return target < v; }, cut, cut - 1);
  if (threadIdx.x == 0) out[row] = ids[row * vocab + pick];
}

}  // namespace

cudaError_t LaunchSampleRows(const float* logits, const double* uniforms, int64_t rows, int64_t vocab, const SamplingParams& p,
                             int32_t* out, void* scratch, size_t scratch_bytes, size_t* needed, cudaStream_t stream) {
  // Scratch: sorted keys [rows, vocab] F32, ids in/out [rows, vocab] I32 x 2, offsets [rows + 1],
  // cumulative sums [rows, vocab] F64, CUB's temporary storage.
  const size_t n = static_cast<size_t>(rows * vocab);
  auto align = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t keys = align(n * 4), ids = align(n * 4), offsets = align((rows + 1) * 4), cum = align(n * 8);
  size_t temp = 0;
  cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(nullptr, temp, logits, static_cast<float*>(nullptr),
                                                                     static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                                     static_cast<int64_t>(n), static_cast<int64_t>(rows),
                                                                     static_cast<const int32_t*>(nullptr),
                                                                     static_cast<const int32_t*>(nullptr), 0, 32, stream);
  if (e != cudaSuccess) return e;
  *needed = keys + 2 * ids + offsets + cum + align(temp);
  if (scratch == nullptr || scratch_bytes < *needed || rows == 0) return cudaSuccess;
  char* base = static_cast<char*>(scratch);
  float* sorted = reinterpret_cast<float*>(base);
  int32_t* ids_in = reinterpret_cast<int32_t*>(base + keys);
  int32_t* ids_out = reinterpret_cast<int32_t*>(base + keys + ids);
  int32_t* offs = reinterpret_cast<int32_t*>(base + keys + 2 * ids);
  double* cumsum = reinterpret_cast<double*>(base + keys + 2 * ids + offsets);
  void* temp_storage = base + keys + 2 * ids + offsets + cum;
  IotaRowsKernel<<<Blocks(static_cast<int64_t>(n) + rows + 1), 256, 0, stream>>>(ids_in, offs, rows, vocab);
  e = cub::DeviceSegmentedRadixSort::SortPairsDescending(temp_storage, temp, logits, sorted, ids_in, ids_out,
                                                         static_cast<int64_t>(n), static_cast<int64_t>(rows), offs, offs + 1, 0, 32,
                                                         stream);
  if (e != cudaSuccess) return e;
  const int keep = p.top_k > 0 && p.top_k < vocab ? p.top_k : static_cast<int>(vocab);
  PickKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(sorted, ids_out, cumsum, uniforms, out, vocab, keep,
                                                                   p.temperature, p.top_p);
  return cudaGetLastError();
}

}  // namespace ferry::kernels::cuda
