// OPT model configuration read from a Hugging Face config.json. Everything ferry cannot run is
// refused with a message naming the config field; nothing unsupported is silently ignored.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace ferry::engine {

struct OptConfig {
  int hidden_size = 0;
  int ffn_dim = 0;
  int num_heads = 0;
  int num_layers = 0;
  int vocab_size = 0;
  int max_positions = 0;        // max_position_embeddings
  int word_embed_proj_dim = 0;  // == hidden_size unless project_in/project_out exist
  bool layer_norm_before = true;
  bool final_layer_norm = true;  // false when do_layer_norm_before is false or _remove_final_layer_norm
  bool enable_bias = true;
  bool tie_word_embeddings = true;
  int bos_token_id = 2;
  int eos_token_id = 2;
  int pad_token_id = 1;

  int head_dim() const { return hidden_size / num_heads; }
  bool has_projection() const { return word_embed_proj_dim != hidden_size; }
  static constexpr int kPositionOffset = 2;  // OPT's learned positions start at row 2

  static absl::StatusOr<OptConfig> FromJson(const std::string& json_text, const std::string& source);
  static absl::StatusOr<OptConfig> FromModelDir(const std::string& dir);
};

}  // namespace ferry::engine
