// `ferry plan` and `--policy auto` (issue 16): the fastest policy that fits, by the cost model.
// The search runs over the layer matrices' format (the store's own, and q4/q8 where allowed: those
// need `ferry convert --quantize` first), KV placement (GPU, CPU) and type, H2O, Deja Vu sparsity
// (a ReLU FFN, where allowed), the number of GPU batches and the GPU batch size; for each it places the weights greedily at 4 KiB granularity:
// as much on the GPU as its budget leaves room for, then as much in pinned CPU memory as that
// budget allows, the rest on disk. Every candidate's memory is Model::PlanOffload's for the same
// reserves the run makes (PolicyOffload), so a chosen plan fits.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/cost_model.h"

namespace ferry::engine {

// What approximations the user accepts beyond exact execution (f32 KV, the store's weights, the
// full cache, the dense FFN). --allow h2o=0.2,q4,q8,kv-f16,kv-q8,kv-q4,sparse=0.15 (or "exact").
struct Allowance {
  std::vector<QuantFormat> weights;             // formats a float store may be converted to
  std::vector<KvType> kv_dtypes = {DType::kF32};
  double h2o = 0.0;                             // H2O keeping this fraction of the context (0: off)
  double sparsity = 0.0;                        // Deja Vu keeping this fraction of the FFN's neurons (0: off; ReLU FFNs)
  bool kv_cpu = true;                           // placement is exact: the cache may live on the host
  std::string Describe() const;
};
absl::StatusOr<Allowance> ParseAllowance(const std::string& spec, int head_dim, int quant_group = 64);

struct PlanRequest {
  ModelConfig config;
  // The store's layout first (what runs as is); then what `convert --quantize` would write. The
  // first runnable_layouts run as they are (a dummy not yet written: all of them).
  std::vector<std::pair<std::optional<QuantFormat>, WeightLayout>> layouts;
  size_t runnable_layouts = 1;
  Workload workload;
  uint64_t device_budget = 0, host_budget = 0;  // 0: none
  bool allow_disk = true;
  Allowance allow;
  io::UringOptions uring;
  int max_batch = 4096;  // sequences in one batch at most
  // Only these shapes (0: searched): generate --policy auto keeps its --batch-size.
  int fixed_gpu_batch_size = 0, fixed_num_gpu_batches = 0;
  bool fixed_kv_on_cpu = false, fix_kv_placement = false;
  // The run's OffloadOptions for a policy and budgets (unset: PolicyOffload for the workload):
  // generate reserves for its own batch and context.
  std::function<OffloadOptions(const Policy&, uint64_t device_budget, uint64_t host_budget)> offload;
};

struct Candidate {
  Policy policy;
  offload::Plan plan;
  Prediction prediction;
  bool runnable = true;  // false: the store must be converted to policy.weights first
};

using FormatLayouts = std::vector<std::pair<std::optional<QuantFormat>, WeightLayout>>;
// The store's own layout, then (a float store) each allowed format as convert would write it.
absl::StatusOr<FormatLayouts> LayoutsOfStore(const io::Store& store, const Allowance& allow);
// A dummy not written yet: float and each allowed format (all runnable: bench writes the chosen).
absl::StatusOr<FormatLayouts> LayoutsOfDummy(const std::string& dummy, const Allowance& allow);
// A checkpoint or GGUF file not converted yet: as `ferry convert` would write it, then each allowed
// format (none runnable: convert first). The config comes with it.
absl::StatusOr<FormatLayouts> LayoutsOfCheckpoint(const std::string& model_dir, const Allowance& allow, ModelConfig* config);

// Every candidate that fits, fastest first (by predicted throughput). Empty: nothing fits, and the
// error says what the smallest policy needs.
absl::StatusOr<std::vector<Candidate>> SearchPolicies(const PlanRequest& request, const CostModel& model, const kernels::Backend& backend);

// The greedy placement of one policy's weights (its split is replaced), or an error saying why
// nothing fits; predicted when `model` is given.
absl::StatusOr<Candidate> PlaceWeights(const PlanRequest& request, const WeightLayout& layout, Policy policy, const CostModel* model,
                                       const kernels::Backend& backend);

// The best candidates as a table: predicted tok/s, prefill, decode step, bound, memory, flags.
std::string PlanTable(const std::vector<Candidate>& candidates, size_t top);

}  // namespace ferry::engine
