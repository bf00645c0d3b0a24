// Next-token choice from fp32 logits: greedy (temperature 0) or sampling with temperature,
// top-k and top-p. Each sequence owns its random stream, seeded from (seed, request index), so
// the same seed gives the same text whatever batch the request lands in.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace ferry::engine {

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  uint64_t seed = 0;
};

absl::Status ValidateSampling(const SamplingOptions& options);

// A small, portable PRNG (SplitMix64 seeding a xoshiro256**), identical on every platform.
class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream);
  uint64_t Next();
  double Uniform();  // [0, 1)

 private:
  uint64_t s_[4];
};

// Index of the largest logit (the lowest index among ties).
int ArgMax(const float* logits, int n);

// Picks the next token; greedy when options.temperature <= 0.
int SampleToken(const float* logits, int n, const SamplingOptions& options, Rng& rng);

}  // namespace ferry::engine
