// The CPU's training ops: fp32 GEMMs through OpenBLAS, the class-balanced BCE gradient over
// bit-packed labels (rows in parallel, the bias gradient summed over rows in order, so the result
// does not depend on the thread count), and Adam.
#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "base/status.h"
#include "base/thread_pool.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::kernels {

absl::Status CpuBackend::MatMul(const MatMulArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateMatMul(a));
  const int64_t m = a.out.shape[0], n = a.out.shape[1], k = a.trans_a ? a.a.shape[0] : a.a.shape[1];
  float* out = a.out.as<float>();
  float beta = 0.0f;
  if (a.bias.data != nullptr) {
    for (int64_t i = 0; i < m; ++i) std::copy_n(a.bias.as<const float>(), n, out + i * n);
    beta = 1.0f;
  }
  if (m == 0 || n == 0) return absl::OkStatus();
  if (k == 0) {
    if (beta == 0.0f) std::fill(out, out + m * n, 0.0f);
    return absl::OkStatus();
  }
  cblas_sgemm(CblasRowMajor, a.trans_a ? CblasTrans : CblasNoTrans, a.trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0f, a.a.as<const float>(), static_cast<int>(a.a.shape[1]),
              a.b.as<const float>(), static_cast<int>(a.b.shape[1]), beta, out, static_cast<int>(n));
  return absl::OkStatus();
}

absl::Status CpuBackend::BceGrad(const BceGradArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateBceGrad(a));
  const int64_t rows = a.z.shape[0], f = a.z.shape[1], row_bytes = a.labels.shape[1];
  const float* z = a.z.as<const float>();
  const uint8_t* bits = a.labels.as<const uint8_t>();
  float* g = a.grad.as<float>();
  const float rows_f = static_cast<float>(rows);
  pool_->ParallelFor(rows, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < f; ++j) {
        const float s = 1.0f / (1.0f + std::exp(-z[i * f + j]));
        const bool on = (bits[i * row_bytes + j / 8] >> (j % 8)) & 1;
        g[i * f + j] = (on ? a.w_pos * (s - 1.0f) : a.w_neg * s) / rows_f;
      }
    }
  });
  float* gb = a.grad_bias.as<float>();
  std::fill(gb, gb + f, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < f; ++j) gb[j] += g[i * f + j];
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::AdamStep(const AdamArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAdam(a));
  float *w = a.w.as<float>(), *m = a.m.as<float>(), *v = a.v.as<float>();
  const float* g = a.g.as<const float>();
  const int64_t n = a.w.numel();
  for (int64_t i = 0; i < n; ++i) {
    m[i] = a.beta1 * m[i] + (1 - a.beta1) * g[i];
    v[i] = a.beta2 * v[i] + (1 - a.beta2) * g[i] * g[i];
    w[i] -= a.lr * (m[i] / a.c1) / (std::sqrt(v[i] / a.c2) + a.eps);
  }
  return absl::OkStatus();
}

}  // namespace ferry::kernels
