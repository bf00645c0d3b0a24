#include "engine/generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::engine {

absl::Status ValidateGenerateOptions(const GenerateOptions& o) {
  if (o.max_new_tokens < 0) return absl::InvalidArgumentError(absl::StrCat("max-new-tokens must be >= 0, got ", o.max_new_tokens));
  if (o.min_new_tokens < 0) return absl::InvalidArgumentError(absl::StrCat("min-new-tokens must be >= 0, got ", o.min_new_tokens));
  if (o.max_prefill_tokens <= 0) return absl::InvalidArgumentError("max_prefill_tokens must be positive");
  if (o.prefill_call_tokens < 0) return absl::InvalidArgumentError("prefill_call_tokens must be >= 0");
  return ValidateSampling(o.sampling);
}

absl::Status ValidatePromptLength(const ModelConfig& config, size_t prompt_tokens) {
  if (prompt_tokens == 0) return absl::InvalidArgumentError("empty prompt");
  if (prompt_tokens > static_cast<size_t>(config.max_positions)) {
    return absl::InvalidArgumentError(absl::StrCat("prompt is ", prompt_tokens, " tokens, longer than the model's context of ",
                                                   config.max_positions, " (max_position_embeddings)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<GenerationResult>> Generate(Model& model,
                                                        const std::vector<GenerationRequest>& requests,
                                                        const GenerateOptions& options) {
  FERRY_RETURN_IF_ERROR(ValidateGenerateOptions(options));
  const ModelConfig& c = model.config();
  const int n = static_cast<int>(requests.size());
  std::vector<GenerationResult> results(n);
  if (n == 0) return results;
  int max_len = 1;
  for (const auto& r : requests) {
    FERRY_RETURN_IF_ERROR(ValidatePromptLength(c, r.prompt.size()));
    for (int id : r.prompt) {
      if (id < 0 || id >= c.vocab_size) return absl::InvalidArgumentError(absl::StrCat("prompt token ", id, " is outside the vocabulary"));
    }
    max_len = static_cast<int>(std::max<int64_t>(
        max_len, std::min<int64_t>(c.max_positions, static_cast<int64_t>(r.prompt.size()) + options.max_new_tokens)));
  }
  if (options.max_new_tokens == 0) {
    for (auto& r : results) r.finish_reason = "length";
    return results;
  }
  offload::KvCacheSpec spec = KvSpec(c, n, max_len, options.kv_dtype);
  if (options.h2o) spec.h2o = offload::ClampToLength(*options.h2o, max_len);  // never more slots than positions
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<offload::AttentionCache> cache, offload::CreateKvCache(model.backend(), spec));
  std::vector<Rng> rngs;
  rngs.reserve(n);
  for (const auto& r : requests) rngs.emplace_back(options.sampling.seed, r.index);

  std::vector<int> length(n);  // tokens in the cache + the pending token
  std::vector<int> pending(n, -1);
  std::vector<bool> running(n, true);
  std::vector<float> logits;

  // The next tokens are chosen on the backend (argmax, or a sample with each sequence's own draw
  // from its host-side random stream), so only token ids come back.
  const bool greedy = options.sampling.temperature <= 0.0f;
  std::vector<int32_t> chosen;
  // Asks the forward pass for chosen ids instead of logits; sequence seqs[i] is logit row i.
  auto want_argmax = [&](ForwardBatch& batch, const std::vector<int>& seqs) {
    batch.ffn_hook = options.ffn_hook;
    batch.argmax_ids = &chosen;
    batch.banned_tokens.assign(c.eos_token_ids.begin(), c.eos_token_ids.end());
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (static_cast<int>(results[seqs[i]].tokens.size()) < options.min_new_tokens) batch.banned_rows.push_back(static_cast<int32_t>(i));
      if (!greedy) batch.sample_uniforms.push_back(rngs[seqs[i]].Uniform());
    }
    if (!greedy) batch.sample = {options.sampling.temperature, options.sampling.top_k, options.sampling.top_p};
  };
  auto choose_row = [&](int, size_t i) { return static_cast<int>(chosen[i]); };

  // Records a freshly chosen token and decides whether the sequence goes on.
  auto accept = [&](int s, int token) {
    results[s].tokens.push_back(token);
    pending[s] = token;
    if (options.stop_at_eos && c.is_eos(token)) {
      running[s] = false;
      results[s].finish_reason = "eos";
    } else if (options.stop_check != nullptr && (*options.stop_check)(s, results[s].tokens)) {
      running[s] = false;
      results[s].finish_reason = "stop";
    } else if (static_cast<int>(results[s].tokens.size()) >= options.max_new_tokens || length[s] >= c.max_positions) {
      running[s] = false;
      results[s].finish_reason = "length";
    }
  };

  // Prefill, several prompts per call up to prefill_call_tokens, in micro-batches of up to
  // max_prefill_tokens (a longer prompt goes alone).
  const int64_t call_cap = std::max(options.prefill_call_tokens, options.max_prefill_tokens);
  for (int s0 = 0; s0 < n;) {
    ForwardBatch batch;
    int s1 = s0;
    int64_t micro_tokens = 0;
    while (s1 < n && (s1 == s0 || static_cast<int64_t>(batch.tokens.size() + requests[s1].prompt.size()) <= call_cap)) {
      const auto& prompt = requests[s1].prompt;
      if (micro_tokens > 0 && micro_tokens + static_cast<int64_t>(prompt.size()) > options.max_prefill_tokens) {
        batch.micro_batch_ends.push_back(static_cast<int32_t>(batch.tokens.size()));
        micro_tokens = 0;
      }
      micro_tokens += static_cast<int64_t>(prompt.size());
      for (size_t i = 0; i < prompt.size(); ++i) {
        batch.tokens.push_back(prompt[i]);
        batch.seq_ids.push_back(s1);
        batch.positions.push_back(static_cast<int32_t>(i));
      }
      batch.logit_rows.push_back(static_cast<int32_t>(batch.tokens.size()) - 1);
      ++s1;
    }
    std::vector<int> seqs(s1 - s0);
    std::iota(seqs.begin(), seqs.end(), s0);
    want_argmax(batch, seqs);
    FERRY_RETURN_IF_ERROR(model.Forward(batch, *cache, &logits));
    for (int s = s0; s < s1; ++s) {
      length[s] = static_cast<int>(requests[s].prompt.size());
      accept(s, choose_row(s, static_cast<size_t>(s - s0)));
    }
    s0 = s1;
  }

  // Decode: one token per running sequence per step.
  for (;;) {
    ForwardBatch batch;
    std::vector<int> seqs;
    for (int s = 0; s < n; ++s) {
      if (!running[s]) continue;
      batch.tokens.push_back(pending[s]);
      batch.seq_ids.push_back(s);
      batch.positions.push_back(length[s]);
      batch.logit_rows.push_back(static_cast<int32_t>(seqs.size()));
      seqs.push_back(s);
    }
    if (seqs.empty()) break;
    want_argmax(batch, seqs);
    batch.ffn_select = options.ffn_select;
    FERRY_RETURN_IF_ERROR(model.Forward(batch, *cache, &logits));
    for (size_t i = 0; i < seqs.size(); ++i) {
      const int s = seqs[i];
      ++length[s];
      accept(s, choose_row(s, i));
    }
  }
  return results;
}

}  // namespace ferry::engine
