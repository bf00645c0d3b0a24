// The `ferry` subcommands. Each registers its flags on a CLI11 app and returns a runner that
// reports failure as a Status (printed as one line by main).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/planner.h"
#include "nlohmann/json.hpp"
#include "offload/h2o_cache.h"

namespace ferry::cli {

using Runner = std::function<absl::Status()>;

// Registers `generate`, `tokenize` and `ppl`; `selected` is set to the chosen command's runner.
void RegisterCommands(CLI::App& app, Runner* selected);

// `bench` (bench_command.cc).
void RegisterBenchCommand(CLI::App& app, Runner* selected);
// `sparsity collect|train|report` (sparsity_command.cc).
void RegisterSparsityCommand(CLI::App& app, Runner* selected);

// `probe` and `plan` (plan_command.cc).
void RegisterPlanCommand(CLI::App& app, Runner* selected);

// What `plan` and `bench --policy auto` plan for.
struct PlanInputFlags {
  std::string model, dummy, store, gpu_mem, cpu_mem, device = "cpu", allow = "exact", probe_dir;
  int prompt_len = 512, gen_len = 32, max_batch = 4096, quant_group = 64;
  int64_t num_prompts = 0;
  unsigned queue_depth = 16;
  std::string block_size = "1MiB";
  bool reprobe = false;
};
// Registers the planning flags; with_model: also the model, workload and budget flags (bench has its own).
void AddPlanInputFlags(CLI::App* cmd, PlanInputFlags* flags, bool with_model);
struct PlanSetup {
  engine::PlanRequest request;
  nlohmann::json probe;
  engine::CostModel model;
  std::string model_name;
  bool needs_convert = false;  // a checkpoint or GGUF file: plans run after ferry convert
};
// The request (config, layouts, workload, budgets, allowance) and the cost model of the cached
// probe (measured first when there is none: the disk part on the store's filesystem).
absl::StatusOr<PlanSetup> SetUpPlan(const PlanInputFlags& flags, kernels::Backend& backend, bool quiet);
// The directory the disk probe uses for a store: the one holding it.
std::string ProbeDirFor(const std::string& store_dir);

// --h2o HEAVY,RECENT [--protect N] or --local N (a recent-only window) into cache options;
// nullopt when neither is given.
absl::StatusOr<std::optional<offload::H2OOptions>> ParseH2O(const std::string& spec, int protect, int local);

// --model's default: $FERRY_MODEL, else the embedded tiny-opt.
std::string DefaultModelDir();

}  // namespace ferry::cli
