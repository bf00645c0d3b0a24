// Test helpers for models: the logits of every position of one sequence, and the relative error
// the golden tests use (max |ours - ref| / max |ref|).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace ferry::testing {

inline absl::StatusOr<std::vector<float>> AllLogits(engine::Model& model, kernels::Backend& backend, const std::vector<int>& ids) {
  auto cache = offload::CreateKvCache(backend, engine::KvSpec(model.config(), 1, static_cast<int>(ids.size())));
  if (!cache.ok()) return cache.status();
  engine::ForwardBatch batch;
  for (size_t i = 0; i < ids.size(); ++i) {
    batch.tokens.push_back(ids[i]);
    batch.seq_ids.push_back(0);
    batch.positions.push_back(static_cast<int32_t>(i));
    batch.logit_rows.push_back(static_cast<int32_t>(i));
  }
  std::vector<float> logits;
  absl::Status s = model.Forward(batch, **cache, &logits);
  if (!s.ok()) return s;
  return logits;
}

inline double RelErr(const float* ours, const float* ref, size_t n) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < n; ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(ours[i]) - ref[i]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(ref[i])));
  }
  return max_diff / max_ref;
}

}  // namespace ferry::testing
