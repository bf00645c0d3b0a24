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
#include "offload/h2o_cache.h"

namespace ferry::cli {

using Runner = std::function<absl::Status()>;

// Registers `generate`, `tokenize` and `ppl`; `selected` is set to the chosen command's runner.
void RegisterCommands(CLI::App& app, Runner* selected);

// `bench` (bench_command.cc).
void RegisterBenchCommand(CLI::App& app, Runner* selected);
// `sparsity collect|train|report` (sparsity_command.cc).
void RegisterSparsityCommand(CLI::App& app, Runner* selected);

// --h2o HEAVY,RECENT [--protect N] or --local N (a recent-only window) into cache options;
// nullopt when neither is given.
absl::StatusOr<std::optional<offload::H2OOptions>> ParseH2O(const std::string& spec, int protect, int local);

// --model's default: $FERRY_MODEL, else the embedded tiny-opt.
std::string DefaultModelDir();

}  // namespace ferry::cli
