// Where each decoder layer's weight bytes live. A layer's block (its region in the store) is split
// at byte offsets, not at tensor boundaries, so any fraction is exact to 4 KiB: [0, gpu_end) stays
// in device memory, [gpu_end, cpu_end) in pinned host memory, [cpu_end, bytes) on disk and is read
// with O_DIRECT on demand. The plan also states what memory the placement needs, so a policy that
// cannot fit its budgets is refused before anything is allocated, saying what is over by how much.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::offload {

struct WeightSplit {
  double gpu = 100.0, cpu = 0.0, disk = 0.0;  // percent of each layer's bytes; sums to 100
};

// Parses "GPU,CPU,DISK" percentages, e.g. "20,50,30".
absl::StatusOr<WeightSplit> ParseWeightSplit(const std::string& text);

struct LayerPlacement {
  uint64_t begin = 0;  // where the placed bytes start in the layer's region (a part of it: sparse FFN)
  uint64_t bytes = 0;
  uint64_t gpu_end = 0;
  uint64_t cpu_end = 0;
  bool streamed() const { return gpu_end < bytes; }
  uint64_t cpu_bytes() const { return cpu_end - gpu_end; }
  uint64_t disk_bytes() const { return bytes - cpu_end; }
};

struct PlanInputs {
  std::vector<uint64_t> layer_bytes;  // each a multiple of 4 KiB
  std::vector<uint64_t> layer_begin;  // optional: where each placed range starts in its region (4 KiB multiples)
  WeightSplit split;
  uint64_t other_device_bytes = 0;    // non-layer weights, small per-layer vectors, KV cache, activations
  uint64_t other_host_bytes = 0;      // pinned memory besides the weights (a KV cache on the CPU)
  uint64_t device_budget = 0;         // 0: none
  uint64_t host_budget = 0;           // 0: none
};

struct Plan {
  std::vector<LayerPlacement> layers;
  uint64_t resident_bytes = 0;   // weights kept in device memory
  uint64_t working_bytes = 0;    // two device slots that streamed layers pass through
  uint64_t pinned_bytes = 0;     // the CPU tier
  uint64_t staging_bytes = 0;    // two pinned slots that disk reads land in
  uint64_t device_bytes = 0;     // total device need (with other_device_bytes)
  uint64_t host_bytes = 0;       // total pinned need
  std::string Describe() const;
};

absl::StatusOr<Plan> MakePlan(const PlanInputs& inputs);

// "24GiB", "512MiB", "1.5G", "1000000": bytes. 1 KiB = 1024.
absl::StatusOr<uint64_t> ParseBytes(const std::string& text);

}  // namespace ferry::offload
