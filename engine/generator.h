// Batched generation: prefill of all prompts (packed, in chunks of bounded size), then decode
// steps over the sequences still running. A sequence's tokens never depend on the rest of the
// batch: the kernels are batch invariant and each sequence samples from its own random stream.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"
#include "engine/sampling.h"
#include "offload/h2o_cache.h"

namespace ferry::engine {

struct GenerateOptions {
  int max_new_tokens = 32;
  int min_new_tokens = 0;  // EOS is suppressed until this many tokens exist (as transformers does)
  SamplingOptions sampling;
  bool stop_at_eos = true;
  int64_t max_prefill_tokens = 4096;  // tokens per prefill micro-batch (the activations' size)
  // Tokens per prefill forward call, cut into micro-batches of at most max_prefill_tokens at
  // prompt boundaries; 0: max_prefill_tokens (one micro-batch per call). An offloaded model streams
  // its weights once per call, so one call over many prompts is FlexGen's schedule: each layer
  // crosses the link once and runs over every micro-batch.
  int64_t prefill_call_tokens = 0;
  std::optional<offload::H2OOptions> h2o;  // evicting KV cache instead of the dense one
  KvType kv_dtype = DType::kF32;           // keys and values in the cache: F32, F16, q8 or q4
  // Optional FFN hook (Deja Vu on a resident model: zeroes the neurons a predictor did not select).
  const std::function<absl::Status(int, const TensorView&, const TensorView&)>* ffn_hook = nullptr;
  // Optional neuron selection for a model loaded with OffloadOptions::sparse_ffn (Deja Vu through
  // the executor: only the chosen bundles are fetched), used in decode steps; prefill computes
  // every neuron.
  const std::function<absl::StatusOr<std::vector<int32_t>>(int, const TensorView&)>* ffn_select = nullptr;
  // Optional stop condition, asked after each token with the request's index and its tokens so
  // far: true ends the sequence with finish_reason "stop" (stop sequences of batch jobs).
  const std::function<bool(int, const std::vector<int>&)>* stop_check = nullptr;
};

struct GenerationRequest {
  std::vector<int> prompt;  // token ids, BOS included
  uint64_t index = 0;       // the request's place in its job: seeds its random stream
};

struct GenerationResult {
  std::vector<int> tokens;    // generated tokens (EOS included when it stopped there)
  std::string finish_reason;  // "eos", "stop" (stop_check) or "length" (max_new_tokens or the context was reached)
};

absl::Status ValidateGenerateOptions(const GenerateOptions& options);
// A prompt must be non-empty and fit the model's context.
absl::Status ValidatePromptLength(const ModelConfig& config, size_t prompt_tokens);

absl::StatusOr<std::vector<GenerationResult>> Generate(Model& model,
                                                        const std::vector<GenerationRequest>& requests,
                                                        const GenerateOptions& options);

}  // namespace ferry::engine
