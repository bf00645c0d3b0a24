#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace ferry::kernels {

int SampleFromLogits(const float* logits, int n, const SamplingParams& o, double u) {
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  const auto by_logit = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  int keep = n;
  if (o.top_k > 0 && o.top_k < n) {
    keep = o.top_k;
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), by_logit);
  } else {
    std::sort(idx.begin(), idx.end(), by_logit);
  }
  std::vector<double> p(keep);
  const double max_logit = logits[idx[0]];
  double sum = 0.0;
  for (int i = 0; i < keep; ++i) {
    p[i] = std::exp((logits[idx[i]] - max_logit) / o.temperature);
    sum += p[i];
  }
  // Top-p: the smallest prefix whose probability reaches top_p (at least one token).
  if (o.top_p < 1.0f) {
    double cum = 0.0;
    int cut = keep;
    for (int i = 0; i < keep; ++i) {
      cum += p[i] / sum;
      if (cum >= o.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = 0.0;
    for (int i = 0; i < keep; ++i) sum += p[i];
  }
  const double target = u * sum;
  double cum = 0.0;
  for (int i = 0; i < keep; ++i) {
    cum += p[i];
    if (target < cum) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace ferry::kernels
