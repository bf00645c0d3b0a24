// Kernel launchers of the CUDA backend (defined in the .cu files), callable from host C++.
// Each enqueues on `stream` and returns cudaGetLastError() after the launch; arguments were
// validated by the backend (shapes, dtypes; ids are validated on the host before upload where a
// bad id could read out of bounds).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/backend.h"

namespace ferry::kernels::cuda {

// out[i, :] = float(table[ids[i] + offset, :])
cudaError_t LaunchGatherRows(const GatherRowsArgs& a, cudaStream_t stream);
cudaError_t LaunchLayerNorm(const LayerNormArgs& a, cudaStream_t stream);
// residual += delta, out = LayerNorm(residual), in one pass where the row fits the register kernel.
cudaError_t LaunchAddLayerNorm(const AddLayerNormArgs& a, cudaStream_t stream);
// RMSNorm per row; the fused variant adds delta into the residual first (norm_rope.cu).
cudaError_t LaunchRmsNorm(const RmsNormArgs& a, cudaStream_t stream);
cudaError_t LaunchAddRmsNorm(const AddRmsNormArgs& a, cudaStream_t stream);
// Rotary embeddings in place; freq_rows were checked against inv_freq's rows on the host.
cudaError_t LaunchRope(const RopeArgs& a, cudaStream_t stream);
cudaError_t LaunchSiluMul(const SiluMulArgs& a, cudaStream_t stream);
// Linear over a q4/q8 weight (a.weight.quant set, `layout` its region), fused dequantize + dot.
cudaError_t LaunchQuantLinear(const LinearArgs& a, const QuantLayout& layout, cudaStream_t stream);
// A quantized [m, k] matrix into m x k fp16 values at `out` (device memory).
cudaError_t LaunchDequantizeToF16(const TensorView& weight, const QuantLayout& layout, void* out, cudaStream_t stream);
// Quantized Deja Vu bundles [m, layout.bytes] into fp16 [m, 2d] (FC1 row | FC2 column), with the
// CPU's arithmetic (fp32 q * s + m) rounded to fp16 once.
cudaError_t LaunchDequantizeBundles(const TensorView& bundles, const BundleQuantLayout& layout, int64_t d, void* out,
                                    cudaStream_t stream);
// out = a + b over n floats.
cudaError_t LaunchAdd(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream);
// Whether the attention kernels read this cache type (F32, F16, q8/q4 with a power-of-two group).
bool KvTypeSupported(const TensorView& cache);
// New keys and values into the cache; q8/q4 caches are quantized one thread per group, bitwise as
// the CPU twin (kv_cache.cuh).
cudaError_t LaunchKvWrite(const KvWriteArgs& a, cudaStream_t stream);
// Per-query attention for the queries rows[0..num_rows) (rows == nullptr: queries 0..num_rows),
// with column sums when a.col_sums is set.
cudaError_t LaunchAttention(const AttentionArgs& a, const int32_t* rows, int64_t num_rows, cudaStream_t stream);
// Tensor-core prefill over tiles {first query, count <= 64}: each tile's queries are one sequence
// at consecutive positions. Needs head_dim % 16 == 0 and head_dim <= 128.
bool PrefillTilesSupported(int head_dim);
cudaError_t LaunchPrefillTiles(const AttentionArgs& a, const int2* tiles, int64_t num_tiles, cudaStream_t stream);
cudaError_t LaunchSlotKvWrite(const SlotKvWriteArgs& a, cudaStream_t stream);
cudaError_t LaunchSlotAttention(const SlotAttentionArgs& a, cudaStream_t stream);
// H2O's bookkeeping, one thread per (token, head).
cudaError_t LaunchH2OPlace(const H2OPlaceArgs& a, cudaStream_t stream);
cudaError_t LaunchH2OUpdate(const H2OUpdateArgs& a, cudaStream_t stream);
// H2O's prefill selection, one block per (prompt, head); max_len <= about 28K (shared memory).
cudaError_t LaunchH2OPrefill(const H2OPrefillArgs& a, cudaStream_t stream);
// dst[i] = convert(src[i]) for n elements, fp32 -> F16 or BF16.
cudaError_t LaunchConvertFromF32(const float* src, void* dst, DType dtype, int64_t n, cudaStream_t stream);
// The split of fp32 activations for an accurate 16-bit GEMM: dst is [2n] elements, dst[i] = round(src[i]),
// dst[n + i] = round((src[i] - dst[i]) * scale).
cudaError_t LaunchSplitFromF32(const float* src, void* dst, DType dtype, int64_t n, float scale, cudaStream_t stream);
// out[r, c] = tmp[r, c] + tmp[rows + r, c] * inv_scale (+ bias[c], then ReLU when asked); tmp is [2 rows, cols].
cudaError_t LaunchCombineSplit(const float* tmp, float* out, const float* bias, int64_t rows, int64_t cols, float inv_scale,
                               bool relu, cudaStream_t stream);
// act[r, j] = max(act[r, j] + bias[j * stride], 0) over [rows, m]; bias is F16/BF16/F32 (Deja Vu bundles).
cudaError_t LaunchStridedBiasRelu(float* act, const void* bias, DType dtype, int64_t stride, int64_t rows, int64_t m,
                                  cudaStream_t stream);
// dst row i (dst_rows[i] when given) = host_table row rows[i] (row_bytes each); host_table is
// pinned (mapped) host memory or device memory, as is dst.
cudaError_t LaunchGatherHostRows(const void* host_table, size_t row_bytes, const int32_t* rows, int64_t n, void* dst,
                                 cudaStream_t stream, const int32_t* dst_rows = nullptr);
// out[r, c] += bias[c] (when bias), then ReLU (when relu), over [rows, cols].
cudaError_t LaunchBiasRelu(float* out, const float* bias, int64_t rows, int64_t cols, bool relu, cudaStream_t stream);

// Samples one id per row (kernels/sampling.h's rule); uniforms: device [rows] F64. With scratch ==
// nullptr (or too small) only sets *needed, the scratch bytes it takes.
cudaError_t LaunchSampleRows(const float* logits, const double* uniforms, int64_t rows, int64_t vocab, const SamplingParams& p,
                             int32_t* out, void* scratch, size_t scratch_bytes, size_t* needed, cudaStream_t stream);
// ids[r] = argmax of logits[r, :] (lowest index among ties), one block per row.
cudaError_t LaunchArgMaxRows(const float* logits, int32_t* ids, int64_t rows, int64_t vocab, cudaStream_t stream);

// Training (training.cu): out[r, :] = row; the BCE gradient and its column sums; Adam.
cudaError_t LaunchBroadcastRows(float* out, const float* row, int64_t rows, int64_t cols, cudaStream_t stream);
cudaError_t LaunchBceGrad(const BceGradArgs& a, cudaStream_t stream);
cudaError_t LaunchAdam(const AdamArgs& a, cudaStream_t stream);

}  // namespace ferry::kernels::cuda
