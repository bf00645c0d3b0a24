// Dummy OPT models for benchmarks without downloaded weights: FlexGen's shapes, random fp16
// weights (generated in parallel, deterministic per seed) written straight into a ferry store.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::engine {

struct DummyShape {
  std::string name;
  int layers, hidden, heads, ffn;
};

// opt-125m, opt-1.3b, opt-6.7b, opt-13b, opt-30b, opt-66b, opt-175b.
const std::vector<DummyShape>& DummyShapes();
absl::StatusOr<DummyShape> FindDummyShape(const std::string& name);
// config.json text of a dummy (vocab 50272, 2048 positions, pre-LN, ReLU, fp16).
std::string DummyConfigJson(const DummyShape& shape);
// Bytes of fp16 weights of the dummy.
uint64_t DummyWeightBytes(const DummyShape& shape);

struct DummyStoreOptions {
  uint64_t seed = 1;
  std::function<void(uint64_t done, uint64_t total)> progress;
};

// Writes the dummy's store (config.json, weights.bin, manifest.json) into out_dir.
absl::Status WriteDummyStore(const DummyShape& shape, const std::string& out_dir, const DummyStoreOptions& options = {});

}  // namespace ferry::engine
