// The family-agnostic description of a decoder-only transformer: what the one layer program needs
// to know (norms, positions, heads, biases, FFN kind, head) and nothing about checkpoint names.
// Each model family (engine/families/) maps its config.json (or GGUF metadata) onto it; what a
// family cannot run is refused there, naming the field.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "offload/kv_cache.h"

namespace ferry::engine {

enum class NormKind : uint8_t { kLayerNorm, kRmsNorm };
enum class FfnKind : uint8_t { kRelu, kSwiGlu };  // fc1 -> ReLU -> fc2 | down(silu(gate) * up)
enum class RopeKind : uint8_t { kNone, kDefault, kLinear, kDynamic, kLlama3, kYarn };

// Rotary embeddings and their scaling, as transformers' rope_scaling describes them.
struct RopeConfig {
  RopeKind kind = RopeKind::kNone;  // kNone: learned absolute positions
  double theta = 10000.0;
  int rotary_dim = 0;                // dims rotated per head
  double factor = 1.0;
  int original_max_positions = 0;    // llama3, yarn, dynamic: the pretraining context
  double low_freq_factor = 1.0, high_freq_factor = 4.0;           // llama3
  double beta_fast = 32.0, beta_slow = 1.0, mscale = 0.0, mscale_all_dim = 0.0;  // yarn
  double attention_factor = 0.0;     // yarn: 0 derives it from factor (and mscale)
  bool truncate = true;              // yarn
};

struct ModelConfig {
  std::string family;      // "opt", "llama"
  std::string model_type;  // config.json's
  int hidden_size = 0;
  int ffn_dim = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim_ = 0;       // not always hidden_size / num_heads
  int num_layers = 0;
  int vocab_size = 0;
  int max_positions = 0;   // max_position_embeddings: the context
  int word_embed_proj_dim = 0;  // OPT's project_in/out; == hidden_size when absent

  NormKind norm = NormKind::kLayerNorm;
  float norm_eps = 1e-5f;
  bool norm_before = true;   // pre-LN; false: OPT-350m's post-LN
  bool final_norm = true;
  int position_offset = 0;   // learned positions: row of position 0 (OPT: 2)
  RopeConfig rope;
  bool qkv_bias = false, o_bias = false, ffn_bias = false;
  bool qk_norm = false;      // Qwen3: RMSNorm over each head of q and k, before the rotation
  FfnKind ffn = FfnKind::kRelu;
  bool tie_word_embeddings = true;

  int bos_token_id = -1;
  std::vector<int> eos_token_ids;
  int pad_token_id = -1;

  int head_dim() const { return head_dim_; }
  int q_width() const { return num_heads * head_dim_; }
  int kv_width() const { return num_kv_heads * head_dim_; }
  int eos_token_id() const { return eos_token_ids.empty() ? -1 : eos_token_ids.front(); }
  bool is_eos(int id) const;
  bool has_projection() const { return word_embed_proj_dim != hidden_size; }
  bool learned_positions() const { return rope.kind == RopeKind::kNone; }
  offload::KvShape kv_shape(KvType dtype = DType::kF32) const { return {num_layers, num_kv_heads, head_dim_, dtype}; }

  // config.json text, through the family its model_type names.
  static absl::StatusOr<ModelConfig> FromJson(const std::string& json_text, const std::string& source);
  static absl::StatusOr<ModelConfig> FromModelDir(const std::string& dir);
};

// The KV cache spec of this model for `rows` sequences of up to `max_len` positions.
offload::KvCacheSpec KvSpec(const ModelConfig& c, int rows, int max_len, KvType dtype = DType::kF32);

}  // namespace ferry::engine
