#include "kernels/registry.h"

#include "absl/strings/str_cat.h"
#include "kernels/cpu/cpu_backend.h"
#ifdef FERRY_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace ferry::kernels {

bool HaveCuda() {
#ifdef FERRY_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

int CudaDeviceCount() {
#ifdef FERRY_HAVE_CUDA
  return cuda::VisibleDeviceCount();
#else
  return 0;
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  if (options.name == "cpu") {
    return std::unique_ptr<Backend>(new CpuBackend(CpuBackendOptions{options.memory_budget_bytes, options.host_budget_bytes}));
  }
  if (options.name == "cuda") {
#ifdef FERRY_HAVE_CUDA
    auto b = cuda::CudaBackend::Create({options.device, options.memory_budget_bytes, options.host_budget_bytes});
    if (!b.ok()) return b.status();
    return std::unique_ptr<Backend>(std::move(*b));
#else
    return absl::UnavailableError("this ferry was built without CUDA (configure with nvcc available, FERRY_CUDA=ON)");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown device \"", options.name, "\" (cpu or cuda)"));
}

}  // namespace ferry::kernels
