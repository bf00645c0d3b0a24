#include "engine/perplexity.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::engine {

std::string NormalizeNewlines(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\r') {
      out.push_back('\n');
      if (i + 1 < text.size() && text[i + 1] == '\n') ++i;
    } else {
      out.push_back(text[i]);
    }
  }
  return out;
}

absl::StatusOr<PerplexityResult> ComputePerplexity(Model& model, const std::vector<int>& ids,
                                                   const PerplexityOptions& o) {
  const ModelConfig& c = model.config();
  if (o.window < 2) return absl::InvalidArgumentError(absl::StrCat("window must be >= 2, got ", o.window));
  if (o.window > c.max_positions) {
    return absl::InvalidArgumentError(absl::StrCat("window ", o.window, " is longer than the model's context of ", c.max_positions));
  }
  if (o.max_tokens < 0) return absl::InvalidArgumentError("max-tokens must be >= 0");
  const int64_t total = o.max_tokens > 0 ? std::min<int64_t>(o.max_tokens, ids.size()) : static_cast<int64_t>(ids.size());
  if (total < 2) return absl::InvalidArgumentError(absl::StrCat("perplexity needs at least 2 tokens, the text has ", total));

  PerplexityResult result;
  result.tokens = total;
  const int64_t windows = (total + o.window - 1) / o.window;
  const int per_call = static_cast<int>(std::max<int64_t>(1, o.tokens_per_call / o.window));
  std::vector<float> logits;
  const int vocab = c.vocab_size;
  // Negative log-likelihood of `target` under a row of logits, in double.
  auto nll = [vocab](const float* row, int target) {
    const float max_logit = *std::max_element(row, row + vocab);
    double sum = 0.0;
    for (int j = 0; j < vocab; ++j) sum += std::exp(static_cast<double>(row[j]) - max_logit);
    return std::log(sum) + max_logit - row[target];
  };
  if (o.h2o.has_value()) {
    for (int64_t w0 = 0; w0 < windows; w0 += per_call) {
      const int64_t w1 = std::min(windows, w0 + per_call);
      offload::KvCacheSpec spec = KvSpec(c, static_cast<int>(w1 - w0), o.window, o.kv_dtype);
      spec.h2o = offload::ClampToLength(*o.h2o, o.window);
      FERRY_ASSIGN_OR_RETURN(std::unique_ptr<offload::AttentionCache> cache, offload::CreateKvCache(model.backend(), spec));
      for (int64_t t = 0; t < o.window; ++t) {
        ForwardBatch step;
        std::vector<int> targets;
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t i = w * o.window + t, end = std::min(total, (w + 1) * o.window);
          if (i >= end) continue;
          step.tokens.push_back(ids[i]);
          step.seq_ids.push_back(static_cast<int32_t>(w - w0));
          step.positions.push_back(static_cast<int32_t>(t));
          step.logit_rows.push_back(static_cast<int32_t>(step.tokens.size()) - 1);
          targets.push_back(i + 1 < end ? ids[i + 1] : -1);
        }
        if (step.tokens.empty()) break;
        step.ffn_hook = o.ffn_hook;
        FERRY_RETURN_IF_ERROR(model.Forward(step, *cache, &logits));
        for (size_t r = 0; r < targets.size(); ++r) {
          if (targets[r] < 0) continue;
          result.nll_sum += nll(logits.data() + r * vocab, targets[r]);
          ++result.scored_tokens;
        }
      }
      if (o.progress) o.progress(std::min(total, w1 * o.window), total);
    }
    result.windows = windows;
    if (result.scored_tokens == 0) return absl::InvalidArgumentError("no token was scored (windows of one token)");
    result.perplexity = std::exp(result.nll_sum / static_cast<double>(result.scored_tokens));
    return result;
  }
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<offload::AttentionCache> cache,
                         offload::CreateKvCache(model.backend(), KvSpec(c, per_call, o.window, o.kv_dtype)));
  for (int64_t w0 = 0; w0 < windows; w0 += per_call) {
    const int64_t w1 = std::min(windows, w0 + per_call);
    ForwardBatch batch;
    std::vector<int> targets;  // target token of each logit row
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t begin = w * o.window, end = std::min(total, begin + o.window);
      for (int64_t i = begin; i < end; ++i) {
        batch.tokens.push_back(ids[i]);
        batch.seq_ids.push_back(static_cast<int32_t>(w - w0));
        batch.positions.push_back(static_cast<int32_t>(i - begin));
        if (i + 1 < end) {
          batch.logit_rows.push_back(static_cast<int32_t>(batch.tokens.size()) - 1);
          targets.push_back(ids[i + 1]);
        }
      }
    }
    batch.ffn_hook = o.ffn_hook;
    FERRY_RETURN_IF_ERROR(model.Forward(batch, *cache, &logits));
    for (size_t r = 0; r < targets.size(); ++r) result.nll_sum += nll(logits.data() + r * vocab, targets[r]);
    result.scored_tokens += static_cast<int64_t>(targets.size());
    if (o.progress) o.progress(std::min(total, w1 * o.window), total);
  }
  result.windows = windows;
  if (result.scored_tokens == 0) return absl::InvalidArgumentError("no token was scored (windows of one token)");
  result.perplexity = std::exp(result.nll_sum / static_cast<double>(result.scored_tokens));
  return result;
}

}  // namespace ferry::engine
