// Creates a backend by name ("cpu" or "cuda"), so callers above the kernels layer need not know
// which backends this build has.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace ferry::kernels {

struct BackendOptions {
  std::string name = "cpu";
  int device = 0;                  // cuda: which GPU
  size_t memory_budget_bytes = 0;  // device memory (the CPU standing in for one: its heap); 0: none
  size_t host_budget_bytes = 0;    // pinned/staging host memory; 0: none
};

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);
// True when this build includes the CUDA backend.
bool HaveCuda();
// Number of visible CUDA devices (0 without CUDA support or a GPU).
int CudaDeviceCount();

}  // namespace ferry::kernels
