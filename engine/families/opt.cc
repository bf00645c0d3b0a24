// OPT (Zhang et al. 2022): learned positions starting at row 2, LayerNorm with bias, ReLU FFN
// (fc1/fc2), biases everywhere, tied head; pre-LN except opt-350m (post-LN, with project_in/out).
#include "absl/strings/str_cat.h"
#include "base/status.h"
#include "engine/family.h"

namespace ferry::engine {
namespace {

using nlohmann::json;
using offload::Role;
using namespace config_fields;

absl::StatusOr<ModelConfig> ParseOpt(const json& j, const std::string& source) {
  FERRY_RETURN_IF_ERROR(RefuseUnknownKeys(
      j, source,
      {"hidden_size", "ffn_dim", "num_attention_heads", "num_hidden_layers", "vocab_size", "max_position_embeddings",
       "word_embed_proj_dim", "do_layer_norm_before", "_remove_final_layer_norm", "enable_bias", "tie_word_embeddings",
       "layer_norm_elementwise_affine", "activation_function"}));
  ModelConfig c;
  FERRY_ASSIGN_OR_RETURN(c.hidden_size, PositiveInt(j, source, "hidden_size"));
  FERRY_ASSIGN_OR_RETURN(c.ffn_dim, PositiveInt(j, source, "ffn_dim"));
  FERRY_ASSIGN_OR_RETURN(c.num_heads, PositiveInt(j, source, "num_attention_heads"));
  FERRY_ASSIGN_OR_RETURN(c.num_layers, PositiveInt(j, source, "num_hidden_layers"));
  FERRY_ASSIGN_OR_RETURN(c.vocab_size, PositiveInt(j, source, "vocab_size"));
  FERRY_ASSIGN_OR_RETURN(c.max_positions, PositiveInt(j, source, "max_position_embeddings"));
  if (c.hidden_size % c.num_heads != 0) {
    return Refuse(source, "num_attention_heads", absl::StrCat("(", c.num_heads, ") must divide hidden_size (", c.hidden_size, ")"));
  }
  c.num_kv_heads = c.num_heads;
  c.head_dim_ = c.hidden_size / c.num_heads;
  FERRY_ASSIGN_OR_RETURN(c.word_embed_proj_dim, OptionalPositiveInt(j, source, "word_embed_proj_dim", c.hidden_size));
  FERRY_ASSIGN_OR_RETURN(c.norm_before, OptionalBool(j, source, "do_layer_norm_before", true));
  FERRY_ASSIGN_OR_RETURN(bool remove_final, OptionalBool(j, source, "_remove_final_layer_norm", false));
  c.final_norm = c.norm_before && !remove_final;
  FERRY_ASSIGN_OR_RETURN(bool bias, OptionalBool(j, source, "enable_bias", true));
  c.qkv_bias = c.o_bias = c.ffn_bias = bias;
  FERRY_ASSIGN_OR_RETURN(c.tie_word_embeddings, OptionalBool(j, source, "tie_word_embeddings", true));
  FERRY_ASSIGN_OR_RETURN(bool affine, OptionalBool(j, source, "layer_norm_elementwise_affine", true));
  if (!affine) return Refuse(source, "layer_norm_elementwise_affine", "false is not supported");
  if (j.contains("activation_function") && !j["activation_function"].is_string()) {
    return Refuse(source, "activation_function", "must be a string");
  }
  const std::string act = j.value("activation_function", std::string("relu"));
  if (act != "relu") return Refuse(source, "activation_function", absl::StrCat("is \"", act, "\"; ferry supports \"relu\""));
  c.norm = NormKind::kLayerNorm;
  c.norm_eps = 1e-5f;
  c.position_offset = 2;
  c.ffn = FfnKind::kRelu;
  FERRY_ASSIGN_OR_RETURN(std::vector<int> bos, TokenIds(j, source, "bos_token_id"));
  FERRY_ASSIGN_OR_RETURN(c.eos_token_ids, TokenIds(j, source, "eos_token_id"));
  FERRY_ASSIGN_OR_RETURN(std::vector<int> pad, TokenIds(j, source, "pad_token_id"));
  c.bos_token_id = bos.empty() ? 2 : bos.front();
  if (c.eos_token_ids.empty()) c.eos_token_ids = {2};
  c.pad_token_id = pad.empty() ? 1 : pad.front();
  return c;
}

}  // namespace

const Family& OptFamily() {
  static const Family family = {
      "opt",
      {"opt"},
      {"model.decoder.", "decoder."},
      {{Role::kTokEmbed, "embed_tokens.weight"},
       {Role::kPosEmbed, "embed_positions.weight"},
       {Role::kProjectIn, "project_in.weight"},
       {Role::kProjectOut, "project_out.weight"},
       {Role::kFinalNorm, "final_layer_norm.weight"},
       {Role::kFinalNormBias, "final_layer_norm.bias"},
       {Role::kLmHead, "lm_head.weight", true},
       {Role::kAttnNorm, "layers.{L}.self_attn_layer_norm.weight"},
       {Role::kAttnNormBias, "layers.{L}.self_attn_layer_norm.bias"},
       {Role::kQ, "layers.{L}.self_attn.q_proj.weight"},
       {Role::kQBias, "layers.{L}.self_attn.q_proj.bias"},
       {Role::kK, "layers.{L}.self_attn.k_proj.weight"},
       {Role::kKBias, "layers.{L}.self_attn.k_proj.bias"},
       {Role::kV, "layers.{L}.self_attn.v_proj.weight"},
       {Role::kVBias, "layers.{L}.self_attn.v_proj.bias"},
       {Role::kO, "layers.{L}.self_attn.out_proj.weight"},
       {Role::kOBias, "layers.{L}.self_attn.out_proj.bias"},
       {Role::kFfnNorm, "layers.{L}.final_layer_norm.weight"},
       {Role::kFfnNormBias, "layers.{L}.final_layer_norm.bias"},
       {Role::kUp, "layers.{L}.fc1.weight"},
       {Role::kUpBias, "layers.{L}.fc1.bias"},
       {Role::kDown, "layers.{L}.fc2.weight"},
       {Role::kDownBias, "layers.{L}.fc2.bias"}},
      ParseOpt};
  return family;
}

}  // namespace ferry::engine
