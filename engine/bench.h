// `ferry bench`: FlexGen's throughput benchmark on ferry's offloading executor. A batch of random
// prompts is prefilled, then decoded step by step; it reports FlexGen's metrics (prefill and decode
// time, total throughput = batch x gen_len / total time), the bytes moved on each link and their
// rates, and the floor: the bytes crossing each link per decode step over that link's bandwidth,
// measured by a short probe in the same run.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "engine/cost_model.h"
#include "io/uring_reader.h"
#include "kernels/registry.h"
#include "nlohmann/json.hpp"
#include "offload/h2o_cache.h"
#include "offload/policy.h"

namespace ferry::engine {

struct BenchOptions {
  std::string store_dir;  // a ferry store
  int prompt_len = 512;
  int gen_len = 32;
  // Weights placement, batch shape (gpu_batch_size x num_gpu_batches), KV placement and type, H2O
  // (policy.weights is not read: the store's format is what runs).
  Policy policy;
  kernels::BackendOptions backend;  // device and budgets (gpu-mem, cpu-mem)
  io::UringOptions uring;
  uint64_t seed = 1;
  // Run the largest gpu_batch_size (x num_gpu_batches) that fits the device budget.
  bool fit_batch = false;
  std::function<void(const std::string&)> progress;  // one line per phase/step
  // Deja Vu through the executor (decode steps; the prefill computes every neuron): FC1/FC2 stay
  // out of the stream and only the chosen neurons' bundles cross the link. Either random neuron
  // sets at this density per token (dummy models), or trained predictors keeping sparsity_k.
  double sparsity_sim = 0.0;   // 0: off
  std::string sparsity_dir;    // empty: off
  double sparsity_k = 0.15;
  double sparsity_dense_above = 0.9;  // a layer whose measured union reaches this runs dense
  double sparsity_cache = 0.0;        // per layer, this fraction of the FFN's bundles cached on the device
  // A probe (`ferry probe`) to predict the run with: the JSON then holds "predicted", the cost
  // model's times for this policy and this plan, beside the measured ones.
  std::optional<nlohmann::json> probe;
  std::string policy_source = "manual";  // "auto": the planner chose the policy (recorded)
};

struct BenchResult {
  nlohmann::json json;  // every number below, plus the configuration
  std::string Table() const;
};

absl::StatusOr<BenchResult> RunBench(const BenchOptions& options);

}  // namespace ferry::engine
