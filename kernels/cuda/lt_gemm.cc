#include "kernels/cuda/lt_gemm.h"

#include "base/status.h"
#include "kernels/cuda/cuda_check.h"

namespace ferry::kernels::cuda {
namespace {

// The largest power of two (up to 256) dividing the address: what the heuristic may assume.
uint32_t Alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

}  // namespace

LtGemm::~LtGemm() {
  for (Plan& p : plans_) Destroy(p);
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

absl::Status LtGemm::Init() {
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle_));
  return absl::OkStatus();
}

void LtGemm::Destroy(Plan& p) {
  if (p.desc != nullptr) cublasLtMatmulDescDestroy(p.desc);
  if (p.la != nullptr) cublasLtMatrixLayoutDestroy(p.la);
  if (p.lb != nullptr) cublasLtMatrixLayoutDestroy(p.lb);
  if (p.ld != nullptr) cublasLtMatrixLayoutDestroy(p.ld);
  p.desc = nullptr;
  p.la = p.lb = p.ld = nullptr;
}

absl::Status LtGemm::MakePlan(Plan& p, const Call& c) {
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t trans_a = c.a_mk ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  const uint32_t epilogue = c.bias != nullptr ? (c.relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS)
                                              : (c.relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT);
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (c.bias != nullptr) {
    const int32_t bias_type = CUDA_R_32F;
    FERRY_CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
    // The heuristic reads the pointer's alignment from here; Run() sets each call's own pointer.
    FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.bias, sizeof(c.bias)));
  }
  // Column-major: A is [k, m] (stored [m, k] row-major, transposed) or [m, k]; B [k, n]; D [m, n].
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&p.la, c.type, c.a_mk ? c.k : c.m, c.a_mk ? c.m : c.k, c.lda));
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&p.lb, c.type, c.k, c.n, c.k));
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&p.ld, CUDA_R_32F, c.m, c.n, c.m));

  cublasLtMatmulPreference_t pref = nullptr;
  FERRY_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = workspace_bytes_;
  cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.align_d},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.align_d}};
  for (const auto& [attr, value] : aligns) {
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.la, p.lb, p.ld, p.ld, pref, 1, &result, &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED || (s == CUBLAS_STATUS_SUCCESS && (found == 0 || result.state != CUBLAS_STATUS_SUCCESS))) {
    p.supported = false;
    return absl::OkStatus();
  }
  FERRY_CUBLAS_RETURN_IF_ERROR(s);
  p.algo = result.algo;
  p.supported = true;
  return absl::OkStatus();
}

absl::StatusOr<bool> LtGemm::Run(const Call& c, cudaStream_t stream) {
  if (handle_ == nullptr) return absl::FailedPreconditionError("LtGemm: Init() was not called");
  const uint32_t align_a = Alignment(c.a), align_b = Alignment(c.b), align_d = Alignment(c.d),
                 align_bias = c.bias != nullptr ? Alignment(c.bias) : 0;
  Plan* plan = nullptr;
  for (Plan& p : plans_) {
    if (p.m == c.m && p.n == c.n && p.k == c.k && p.lda == c.lda && p.a_mk == c.a_mk && p.relu == c.relu &&
        p.bias == (c.bias != nullptr) && p.type == c.type && p.align_a == align_a && p.align_b == align_b &&
        p.align_d == align_d && p.align_bias == align_bias) {
      plan = &p;
      break;
    }
  }
  if (plan == nullptr) {
    if (plans_.size() < kMaxPlans) {
      plan = &plans_.emplace_back();
    } else {
      plan = &plans_[next_];
      next_ = (next_ + 1) % kMaxPlans;
      Destroy(*plan);
    }
    *plan = Plan{c.m, c.n, c.k, c.lda, c.a_mk, c.relu, c.bias != nullptr, c.type, align_a, align_b, align_d, align_bias};
    const absl::Status made = MakePlan(*plan, c);
    if (!made.ok()) {
      Destroy(*plan);
      plan->m = -1;  // matches no call
      return made;
    }
  }
  if (!plan->supported) {
    ++unsupported_;
    return false;
  }
  if (c.bias != nullptr) {
    FERRY_CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.bias, sizeof(c.bias)));
  }
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t st = cublasLtMatmul(handle_, plan->desc, &alpha, c.a, plan->la, c.b, plan->lb, &beta, c.d, plan->ld, c.d,
                                           plan->ld, &plan->algo, workspace_, workspace_bytes_, stream);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) {  // refused at launch (nothing was queued): fall back from now on
    plan->supported = false;
    ++unsupported_;
    return false;
  }
  FERRY_CUBLAS_RETURN_IF_ERROR(st);
  ++calls_;
  return true;
}

}  // namespace ferry::kernels::cuda
