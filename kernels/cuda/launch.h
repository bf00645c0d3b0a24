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
// out = a + b over n floats.
cudaError_t LaunchAdd(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream);
cudaError_t LaunchKvWrite(const KvWriteArgs& a, cudaStream_t stream);
cudaError_t LaunchAttention(const AttentionArgs& a, cudaStream_t stream);
// dst[i] = convert(src[i]) for n elements, fp32 -> F16 or BF16.
cudaError_t LaunchConvertFromF32(const float* src, void* dst, DType dtype, int64_t n, cudaStream_t stream);
// out[r, c] += bias[c] (when bias), then ReLU (when relu), over [rows, cols].
cudaError_t LaunchBiasRelu(float* out, const float* bias, int64_t rows, int64_t cols, bool relu, cudaStream_t stream);

// ids[r] = argmax of logits[r, :] (lowest index among ties), one block per row.
cudaError_t LaunchArgMaxRows(const float* logits, int32_t* ids, int64_t rows, int64_t vocab, cudaStream_t stream);

}  // namespace ferry::kernels::cuda
