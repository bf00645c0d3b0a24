// The CPU ops of the Llama-family layer program: RMSNorm (and its fused residual add), rotary
// position embeddings in transformers' half-split layout, and SwiGLU's silu(gate) * up. fp32, in
// the order transformers computes them in float32, and batch invariant like every CPU kernel.
#include <cmath>
#include <vector>

#include "base/thread_pool.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::kernels {

void CpuRmsNorm(ThreadPool& pool, const RmsNormArgs& a) {
  const int64_t n = a.in.shape[0], dim = a.in.shape[1];
  const float* gamma = a.gamma.as<const float>();
  pool.ParallelFor(n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = a.in.as<const float>() + i * dim;
      float* y = a.out.as<float>() + i * dim;
      double sum = 0.0;
      for (int64_t j = 0; j < dim; ++j) sum += static_cast<double>(x[j]) * x[j];
      const float var = static_cast<float>(sum / static_cast<double>(dim));
      const float inv = 1.0f / std::sqrt(var + a.eps);
      for (int64_t j = 0; j < dim; ++j) y[j] = gamma[j] * (x[j] * inv);
    }
  });
}

absl::Status CpuBackend::RmsNorm(const RmsNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateRmsNorm(a));
  CpuRmsNorm(*pool_, a);
  return absl::OkStatus();
}

absl::Status CpuBackend::AddRmsNorm(const AddRmsNormArgs& a) {
  // The two ops in turn: the same bits as the unfused pair.
  FERRY_RETURN_IF_ERROR(ValidateAddRmsNorm(a));
  FERRY_RETURN_IF_ERROR(Add(a.residual, a.delta, a.residual));
  CpuRmsNorm(*pool_, {a.residual, a.gamma, a.out, a.eps});
  return absl::OkStatus();
}

absl::Status CpuBackend::Rope(const RopeArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateRope(a));
  const int64_t n = a.x.shape[0], width = a.x.shape[1], heads = a.num_heads, hd = width / heads;
  const int64_t half = a.rotary_dim / 2, tables = a.inv_freq.shape[0];
  const int32_t* rows = a.freq_rows.data != nullptr ? a.freq_rows.as<const int32_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    if (rows != nullptr && (rows[i] < 0 || rows[i] >= tables)) return absl::InvalidArgumentError("Rope: freq_rows out of range");
  }
  pool_->ParallelFor(n, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t i = begin; i < end; ++i) {
      const float pos = static_cast<float>(a.positions.as<const int32_t>()[i]);
      const float* inv_freq = a.inv_freq.as<const float>() + (rows != nullptr ? rows[i] : 0) * half;
      for (int64_t d = 0; d < half; ++d) {
        const float angle = pos * inv_freq[d];
        cs[d] = std::cos(angle) * a.attention_scaling;
        sn[d] = std::sin(angle) * a.attention_scaling;
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* x = a.x.as<float>() + i * width + h * hd;
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = x[d], x2 = x[d + half];
          x[d] = x1 * cs[d] + -x2 * sn[d];
          x[d + half] = x2 * cs[d] + x1 * sn[d];
        }
      }
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::SiluMul(const SiluMulArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSiluMul(a));
  const float* g = a.gate.as<const float>();
  const float* u = a.up.as<const float>();
  float* out = a.out.as<float>();
  pool_->ParallelFor(a.gate.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
  return absl::OkStatus();
}

}  // namespace ferry::kernels
