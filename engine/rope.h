// Rotary frequencies as transformers' rope initializers compute them: the default (base^(-2i/d)),
// linear (divided by the factor), dynamic NTK (the base grown with the sequence length once it
// passes the pretraining context), llama3 (low frequencies divided by the factor, a smooth blend
// between) and yarn (a ramp between interpolated and extrapolated frequencies, with its attention
// factor scaling cos and sin).
#pragma once

#include <vector>

#include "engine/model_config.h"

namespace ferry::engine {

struct RopeFrequencies {
  std::vector<float> inv_freq;  // rotary_dim / 2
  float attention_scaling = 1.0f;
};

// `seq_len` matters only for dynamic NTK (the longest sequence the call's token belongs to).
RopeFrequencies ComputeRopeFrequencies(const RopeConfig& rope, int seq_len);

}  // namespace ferry::engine
