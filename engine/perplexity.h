// Perplexity in the convention of goldens.json: the token stream (one BOS at the start) is cut
// into non-overlapping windows; each window is an independent sequence (positions from 0) and
// scores its tokens 1..n-1 given the earlier tokens of the same window.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"
#include "offload/h2o_cache.h"

namespace ferry::engine {

struct PerplexityOptions {
  int window = 512;
  int64_t max_tokens = 0;  // 0: all tokens
  int64_t tokens_per_call = 2048;  // windows are batched into forward calls of about this size
  std::function<void(int64_t done, int64_t total)> progress;  // optional, called per forward call
  // When set, each window runs token by token (teacher forcing) through an H2O evicting cache.
  std::optional<offload::H2OOptions> h2o;
  KvType kv_dtype = DType::kF32;  // keys and values in the cache: F32, F16, q8 or q4
  // Optional FFN hook (contextual sparsity: zeroes the neurons a predictor did not select).
  const std::function<absl::Status(int, const TensorView&, const TensorView&)>* ffn_hook = nullptr;
};

struct PerplexityResult {
  double perplexity = 0.0;
  double nll_sum = 0.0;
  int64_t scored_tokens = 0;
  int64_t tokens = 0;
  int64_t windows = 0;
};

// Python's text-mode reading ("universal newlines"): \r\n and lone \r become \n. The goldens'
// texts were read that way.
std::string NormalizeNewlines(const std::string& text);

absl::StatusOr<PerplexityResult> ComputePerplexity(Model& model, const std::vector<int>& ids,
                                                   const PerplexityOptions& options);

}  // namespace ferry::engine
