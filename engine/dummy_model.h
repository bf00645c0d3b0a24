// Dummy models for benchmarks without downloaded weights: the real shapes of OPT (FlexGen's),
// Llama 2 and 3, Qwen2.5 and Mistral, random fp16 weights (generated in parallel, deterministic per
// seed) written straight into a ferry store. The tensors are those the family's config implies
// (engine/family.h's roles), named by the family's table: a dummy is loaded like any store.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/quant.h"
#include "io/store.h"

namespace ferry::engine {

struct DummyShape {
  std::string name;
  std::string model_type;  // "opt", "llama", "qwen2", "mistral"
  int layers, hidden, heads, kv_heads, ffn, vocab, positions;
  double rope_theta = 10000.0;
};

// opt-125m ... opt-175b, llama-2-7b/13b/70b, llama-3-8b/70b, qwen2.5-7b/32b, mistral-7b.
const std::vector<DummyShape>& DummyShapes();
absl::StatusOr<DummyShape> FindDummyShape(const std::string& name);
// config.json text of a dummy (fp16; OPT: pre-LN, ReLU; the others: their family's defaults).
std::string DummyConfigJson(const DummyShape& shape);
// Bytes of fp16 weights of the dummy.
uint64_t DummyWeightBytes(const DummyShape& shape);

struct DummyStoreOptions {
  uint64_t seed = 1;
  // Layer matrices stored quantized (random codes, fixed group parameters) instead of fp16.
  std::optional<QuantFormat> quantize;
  std::function<void(uint64_t done, uint64_t total)> progress;
};

// The tensors the dummy's store holds (layer matrices as `quantize` when set): its layout can be
// planned without writing it (io::LayoutStore).
absl::StatusOr<std::vector<io::PlannedTensor>> DummyPlannedTensors(const DummyShape& shape, const std::optional<QuantFormat>& quantize);

// Writes the dummy's store (config.json, weights.bin, manifest.json) into out_dir.
absl::Status WriteDummyStore(const DummyShape& shape, const std::string& out_dir, const DummyStoreOptions& options = {});

}  // namespace ferry::engine
