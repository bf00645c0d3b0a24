// `ferry probe` (issue 16, first part): measures once what the cost model needs and caches it as
// JSON per host and backend: pinned host->device and device->host copy rates by chunk size, the
// disk's O_DIRECT read rate by request size and queue depth on a given filesystem (io_uring, the
// streamer's path), Linear (GEMM/GEMV) rates by shape and weight type (F32, F16, q8, q4: the
// dequantization included), decode attention's KV read rate, and host memcpy. On the CPU stand-in
// the same probe measures the stand-in's "links" (memcpy between host buffers). Every rate is the
// median of timed repetitions, each at least min_seconds long.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {

struct ProbeOptions {
  std::string disk_dir;  // probe O_DIRECT reads of a scratch file here ("" : no disk probe)
  uint64_t disk_file_bytes = uint64_t{256} << 20;
  std::vector<uint64_t> copy_chunks = {64 << 10, 1 << 20, 16 << 20, 64 << 20};
  std::vector<uint64_t> disk_blocks = {128 << 10, 1 << 20, 4 << 20};
  std::vector<unsigned> disk_depths = {1, 4, 16, 64};
  // Reads of one span each (a layer's disk part is one read), at the streamer's default 1 MiB x 16.
  std::vector<uint64_t> disk_spans = {4 << 20, 16 << 20, 64 << 20};
  // Linear shapes: rows x (n, n) for each weight type and each n (small matrices pay the launch
  // or dispatch, large ones leave the caches: the cost model interpolates in the matrix size;
  // 64 and 256 are the small checkpoints' widths, where the dispatch is most of a call).
  std::vector<int64_t> gemm_rows = {1, 16, 256};
  std::vector<int64_t> gemm_sizes = {64, 256, 512, 1024, 2048, 4096};
  // The calls rotate over copies of the weights at least this large in all, so that they are read
  // from memory as a model's weights are (a matrix read again and again stays in the caches).
  uint64_t linear_rotate_bytes = uint64_t{256} << 20;
  int attention_len = 1024, attention_rows = 8;
  int prefill_attention_len = 256;  // causal queries of one sequence
  double min_seconds = 0.1;  // per timed repetition
  bool quick = false;         // a smoke run's small shapes: cached apart, never used for planning
  int repetitions = 5;
  std::function<void(const std::string&)> progress;
  // The run's budgets (0: none): a probe that would need more is refused (measure once without
  // them: the probe is cached per host), never run past them.
  uint64_t device_budget = 0, host_budget = 0;
};

// About the most device and pinned memory RunProbe holds at once with these options.
struct ProbeMemory {
  uint64_t device = 0, host = 0;
};
ProbeMemory ProbeNeeds(const ProbeOptions& options);

// Measures everything; the JSON holds "host", "backend", "probed_at" (unix seconds), "options"
// and one section per measurement (each entry with its parameters and a rate).
absl::StatusOr<nlohmann::json> RunProbe(kernels::Backend& backend, const ProbeOptions& options);

// Where the probe of this host and backend is cached: $FERRY_PROBE_DIR, else
// $XDG_CACHE_HOME/ferry/probe, else ~/.cache/ferry/probe; file HOST-BACKEND.json.
std::string ProbeCachePath(const kernels::Backend& backend);

// The cached probe when one exists for this host and backend and `reprobe` is false; else a fresh
// probe, written to the cache (atomically). `*from_cache` says which.
absl::StatusOr<nlohmann::json> LoadOrProbe(kernels::Backend& backend, const ProbeOptions& options, bool reprobe,
                                           bool* from_cache = nullptr);

// A human-readable table of a probe.
std::string ProbeTable(const nlohmann::json& probe);

}  // namespace ferry::engine
