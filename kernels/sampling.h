// The next-token sampling rule shared by every backend (engine::SampleToken on the host, the
// backends' SampleRows): candidates sorted by logit, descending, ties by the lower id; the top_k
// first (0: all); probabilities exp((logit - max) / temperature) in double; with top_p < 1 the
// smallest prefix whose normalized mass reaches top_p (at least one token); then the first
// candidate whose cumulative mass exceeds u x the prefix's mass, u in [0, 1).
#pragma once

namespace ferry::kernels {

struct SamplingParams {
  float temperature = 1.0f;  // > 0 (greedy is ArgMaxRows)
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
};

int SampleFromLogits(const float* logits, int n, const SamplingParams& params, double u);

}  // namespace ferry::kernels
