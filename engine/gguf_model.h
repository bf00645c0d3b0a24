// Models in GGUF files (llama.cpp's format): the metadata becomes the family's config.json, the
// tensors (llama.cpp's names: token_embd, blk.N.attn_q, ...) are presented under the family's
// checkpoint names, dequantized at load, with the Q/K row permutation llama.cpp's converter
// applies for the llama architecture undone, so the rest of ferry sees an ordinary checkpoint.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "base/quant.h"
#include "base/dtype.h"
#include "engine/model_config.h"
#include "io/gguf.h"
#include "io/tensor_source.h"

namespace ferry::engine {

// True for a path to a regular file that starts with the GGUF magic.
bool IsGgufFile(const std::string& path);

struct GgufLoadOptions {
  // The dtype quantized tensors (and F32 matrices) are dequantized to; F16/BF16 tensors keep theirs
  // unless this is F32. Vectors (norms, biases) are always read as F32.
  DType dtype = DType::kF16;
  // Not only for GGUF files: a resident load quantizes every layer matrix (Q, K, V, O, gate, up,
  // down) to this group-wise format; embeddings, the LM head and vectors keep their dtype.
  std::optional<QuantFormat> quantize;
};

// A model read from a GGUF file: its config.json text (model_type and fields of the family that
// runs its architecture), the parsed config, its tokenizer.json text and the tensors.
struct GgufModel {
  std::string config_json;
  ModelConfig config;
  std::string tokenizer_json;
  std::string chat_template;  // tokenizer.chat_template ("" when absent)
  std::unique_ptr<io::TensorSource> tensors;
};

absl::StatusOr<GgufModel> OpenGgufModel(const std::string& path, const GgufLoadOptions& options = {});

// The config.json of a GGUF file's metadata; refuses architectures no family runs, and metadata
// of the architecture that ferry does not understand (by key).
absl::StatusOr<std::string> ConfigJsonFromGguf(const io::GgufFile& file);

}  // namespace ferry::engine
