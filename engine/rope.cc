#include "engine/rope.h"

#include <algorithm>
#include <cmath>

namespace ferry::engine {
namespace {

// base^(-i/dim) for i = 0, 2, .., dim - 2, in fp32 as torch computes base ** (arange / dim).
std::vector<float> DefaultInvFreq(double base, int dim) {
  std::vector<float> f(static_cast<size_t>(dim / 2));
  for (int i = 0; i < dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    const float p = std::pow(static_cast<float>(base), exponent);
    f[i] = 1.0f / p;
  }
  return f;
}

}  // namespace

RopeFrequencies ComputeRopeFrequencies(const RopeConfig& r, int seq_len) {
  const int dim = r.rotary_dim;
  RopeFrequencies out;
  switch (r.kind) {
    case RopeKind::kNone:
      return out;
    case RopeKind::kDefault:
      out.inv_freq = DefaultInvFreq(r.theta, dim);
      return out;
    case RopeKind::kLinear:
      out.inv_freq = DefaultInvFreq(r.theta, dim);
      for (float& f : out.inv_freq) f /= static_cast<float>(r.factor);
      return out;
    case RopeKind::kDynamic: {
      double base = r.theta;
      if (seq_len > r.original_max_positions) {
        const double ratio = r.factor * seq_len / r.original_max_positions - (r.factor - 1.0);
        base = base * std::pow(ratio, static_cast<double>(dim) / (dim - 2));
      }
      out.inv_freq = DefaultInvFreq(base, dim);
      return out;
    }
    case RopeKind::kLlama3: {
      out.inv_freq = DefaultInvFreq(r.theta, dim);
      const double old_len = r.original_max_positions;
      const double low_wavelen = old_len / r.low_freq_factor, high_wavelen = old_len / r.high_freq_factor;
      const float factor = static_cast<float>(r.factor);
      for (float& f : out.inv_freq) {
        const float wavelen = static_cast<float>(2 * M_PI) / f;
        float scaled = wavelen > low_wavelen ? f / factor : f;
        if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {  // medium frequencies: a smooth blend
          const float smooth = static_cast<float>((old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor));
          scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
        }
        f = scaled;
      }
      return out;
    }
    case RopeKind::kYarn: {
      auto get_mscale = [](double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
      double attention = r.attention_factor;
      if (attention == 0.0) {
        attention = (r.mscale != 0.0 && r.mscale_all_dim != 0.0) ? get_mscale(r.factor, r.mscale) / get_mscale(r.factor, r.mscale_all_dim)
                                                                 : get_mscale(r.factor, 1.0);
      }
      out.attention_scaling = static_cast<float>(attention);
      const double base = r.theta;
      const double orig = r.original_max_positions;
      auto correction_dim = [&](double rotations) { return (dim * std::log(orig / (rotations * 2 * M_PI))) / (2 * std::log(base)); };
      double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
      if (r.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(dim - 1));
      if (low == high) high += 0.001;
      out.inv_freq.resize(static_cast<size_t>(dim / 2));
      for (int i = 0; i < dim / 2; ++i) {
        const float pos_freq = std::pow(static_cast<float>(base), static_cast<float>(2 * i) / static_cast<float>(dim));
        const float extrapolation = 1.0f / pos_freq, interpolation = 1.0f / (static_cast<float>(r.factor) * pos_freq);
        const float ramp = std::clamp(static_cast<float>((i - low) / (high - low)), 0.0f, 1.0f);
        const float extra_factor = 1.0f - ramp;
        out.inv_freq[i] = interpolation * (1.0f - extra_factor) + extrapolation * extra_factor;
      }
      return out;
    }
  }
  return out;
}

}  // namespace ferry::engine
