// The Llama family: model_type llama (Llama 2, 3, 3.1, 3.2, SmolLM2, TinyLlama), mistral, qwen2
// and qwen3. RMSNorm, rotary positions (with their scaling), grouped-query attention, SwiGLU, no
// biases except where the config asks (Llama's attention_bias and mlp_bias) or the family has
// them (Qwen2's q/k/v); Qwen3 normalizes each head of q and k. Defaults follow transformers'
// config classes for each model_type.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/status.h"
#include "engine/family.h"

namespace ferry::engine {
namespace {

using nlohmann::json;
using offload::Role;
using namespace config_fields;

absl::Status ParseRopeScaling(const json& j, const std::string& source, ModelConfig* c) {
  RopeConfig& r = c->rope;
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return absl::OkStatus();
  const json& s = j["rope_scaling"];
  if (!s.is_object()) return Refuse(source, "rope_scaling", "must be an object or null");
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    if (s.contains(key)) {
      if (!s[key].is_string()) return Refuse(source, absl::StrCat("rope_scaling.", key), "must be a string");
      type = s[key].get<std::string>();
      break;
    }
  }
  const std::string where = "rope_scaling";
  for (auto it = s.begin(); it != s.end(); ++it) {
    static const std::vector<std::string> kKeys = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                                                   "mscale_all_dim", "attention_factor", "truncate"};
    if (std::find(kKeys.begin(), kKeys.end(), it.key()) == kKeys.end()) {
      return Refuse(source, absl::StrCat(where, ".", it.key()), "is not supported by ferry");
    }
  }
  auto number = [&](const char* key, double fallback, bool required) -> absl::StatusOr<double> {
    if (!s.contains(key) || s[key].is_null()) {
      if (required) return Refuse(source, absl::StrCat(where, ".", key), absl::StrCat("is required for rope_type \"", type, "\""));
      return fallback;
    }
    if (!s[key].is_number() || !std::isfinite(s[key].get<double>())) return Refuse(source, absl::StrCat(where, ".", key), "must be a number");
    return s[key].get<double>();
  };
  if (type == "default") return absl::OkStatus();
  if (type != "linear" && type != "dynamic" && type != "llama3" && type != "yarn") {
    return Refuse(source, "rope_scaling.rope_type",
                  absl::StrCat("is \"", type, "\"; ferry supports default, linear, dynamic, llama3 and yarn"));
  }
  FERRY_ASSIGN_OR_RETURN(r.factor, number("factor", 1.0, true));
  if (r.factor < 1.0) return Refuse(source, "rope_scaling.factor", "must be >= 1");
  FERRY_ASSIGN_OR_RETURN(const double original, number("original_max_position_embeddings", c->max_positions, type == "llama3"));
  if (original < 1 || original > (1 << 30)) return Refuse(source, "rope_scaling.original_max_position_embeddings", "is out of range");
  r.original_max_positions = static_cast<int>(original);
  if (type == "linear") {
    r.kind = RopeKind::kLinear;
  } else if (type == "dynamic") {
    // Dynamic NTK stretches the context past max_position_embeddings (the pretraining length).
    r.kind = RopeKind::kDynamic;
    r.original_max_positions = c->max_positions;
    const double extended = std::floor(c->max_positions * r.factor);
    c->max_positions = static_cast<int>(std::min<double>(extended, 1 << 30));
  } else if (type == "llama3") {
    r.kind = RopeKind::kLlama3;
    FERRY_ASSIGN_OR_RETURN(r.low_freq_factor, number("low_freq_factor", 1.0, true));
    FERRY_ASSIGN_OR_RETURN(r.high_freq_factor, number("high_freq_factor", 4.0, true));
    if (r.high_freq_factor <= r.low_freq_factor) return Refuse(source, "rope_scaling.high_freq_factor", "must exceed low_freq_factor");
  } else {
    r.kind = RopeKind::kYarn;
    FERRY_ASSIGN_OR_RETURN(r.beta_fast, number("beta_fast", 32.0, false));
    FERRY_ASSIGN_OR_RETURN(r.beta_slow, number("beta_slow", 1.0, false));
    FERRY_ASSIGN_OR_RETURN(r.mscale, number("mscale", 0.0, false));
    FERRY_ASSIGN_OR_RETURN(r.mscale_all_dim, number("mscale_all_dim", 0.0, false));
    FERRY_ASSIGN_OR_RETURN(r.attention_factor, number("attention_factor", 0.0, false));
    FERRY_ASSIGN_OR_RETURN(r.truncate, OptionalBool(s, source, "truncate", true));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseLlama(const json& j, const std::string& source) {
  const std::string type = j["model_type"].get<std::string>();
  FERRY_RETURN_IF_ERROR(RefuseUnknownKeys(
      j, source,
      {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
       "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "mlp_bias",
       "tie_word_embeddings", "hidden_act", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
       "partial_rotary_factor"}));
  ModelConfig c;
  FERRY_ASSIGN_OR_RETURN(c.hidden_size, PositiveInt(j, source, "hidden_size"));
  FERRY_ASSIGN_OR_RETURN(c.ffn_dim, PositiveInt(j, source, "intermediate_size"));
  FERRY_ASSIGN_OR_RETURN(c.num_layers, PositiveInt(j, source, "num_hidden_layers"));
  FERRY_ASSIGN_OR_RETURN(c.num_heads, PositiveInt(j, source, "num_attention_heads"));
  FERRY_ASSIGN_OR_RETURN(c.vocab_size, PositiveInt(j, source, "vocab_size"));
  FERRY_ASSIGN_OR_RETURN(c.max_positions, PositiveInt(j, source, "max_position_embeddings"));
  FERRY_ASSIGN_OR_RETURN(c.num_kv_heads, OptionalPositiveInt(j, source, "num_key_value_heads", type == "mistral" ? 8 : c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0) {
    return Refuse(source, "num_key_value_heads",
                  absl::StrCat("(", c.num_kv_heads, ") must divide num_attention_heads (", c.num_heads, ")"));
  }
  int default_head_dim = 0;
  if (type == "qwen3") {
    default_head_dim = 128;  // Qwen3Config's default
  } else if (c.hidden_size % c.num_heads == 0) {
    default_head_dim = c.hidden_size / c.num_heads;
  }
  FERRY_ASSIGN_OR_RETURN(c.head_dim_, OptionalPositiveInt(j, source, "head_dim", default_head_dim));
  if (c.head_dim_ == 0) {
    return Refuse(source, "head_dim", absl::StrCat("is missing and num_attention_heads (", c.num_heads, ") does not divide hidden_size"));
  }
  if (c.head_dim_ % 2 != 0 || c.head_dim_ > 1024) return Refuse(source, "head_dim", "must be even and at most 1024");
  c.word_embed_proj_dim = c.hidden_size;
  FERRY_ASSIGN_OR_RETURN(const double eps, OptionalNumber(j, source, "rms_norm_eps", 1e-6));
  if (eps <= 0) return Refuse(source, "rms_norm_eps", "must be positive");
  c.norm = NormKind::kRmsNorm;
  c.norm_eps = static_cast<float>(eps);
  c.norm_before = c.final_norm = true;
  c.ffn = FfnKind::kSwiGlu;
  if (j.contains("hidden_act") && !j["hidden_act"].is_string()) return Refuse(source, "hidden_act", "must be a string");
  const std::string act = j.value("hidden_act", std::string("silu"));
  if (act != "silu") return Refuse(source, "hidden_act", absl::StrCat("is \"", act, "\"; ferry supports \"silu\""));
  FERRY_ASSIGN_OR_RETURN(c.tie_word_embeddings, OptionalBool(j, source, "tie_word_embeddings", false));

  // Biases and norms by model_type.
  FERRY_ASSIGN_OR_RETURN(const bool attention_bias, OptionalBool(j, source, "attention_bias", false));
  FERRY_ASSIGN_OR_RETURN(c.ffn_bias, OptionalBool(j, source, "mlp_bias", false));
  if (type == "qwen2") {
    c.qkv_bias = true;  // Qwen2's q/k/v projections have biases, its output projection none
    if (j.contains("attention_bias")) return Refuse(source, "attention_bias", "is not a qwen2 field");
  } else {
    c.qkv_bias = c.o_bias = attention_bias;
  }
  if ((type == "mistral" || type == "qwen2" || type == "qwen3") && j.contains("mlp_bias")) {
    return Refuse(source, "mlp_bias", absl::StrCat("is not a ", type, " field"));
  }
  c.qk_norm = type == "qwen3";

  // Positions.
  FERRY_ASSIGN_OR_RETURN(c.rope.theta, OptionalNumber(j, source, "rope_theta", 10000.0));
  if (c.rope.theta <= 1.0) return Refuse(source, "rope_theta", "must be above 1");
  FERRY_ASSIGN_OR_RETURN(const double partial, OptionalNumber(j, source, "partial_rotary_factor", 1.0));
  if (partial != 1.0) return Refuse(source, "partial_rotary_factor", absl::StrCat("is ", partial, "; the ", type, " family rotates whole heads"));
  c.rope.kind = RopeKind::kDefault;
  c.rope.rotary_dim = c.head_dim_;
  FERRY_RETURN_IF_ERROR(ParseRopeScaling(j, source, &c));

  // Sliding windows: a window as long as the context changes nothing; Mistral's shorter window
  // is exact for sequences up to the window, so the context becomes the window.
  if (type == "qwen2" || type == "qwen3") {
    FERRY_ASSIGN_OR_RETURN(const bool sliding, OptionalBool(j, source, "use_sliding_window", false));
    if (sliding) return Refuse(source, "use_sliding_window", "true is not supported (per-layer sliding windows)");
  }
  if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    if (!j["layer_types"].is_array()) return Refuse(source, "layer_types", "must be a list");
    for (const json& t : j["layer_types"]) {
      if (!t.is_string() || t.get<std::string>() != "full_attention") {
        return Refuse(source, "layer_types", "lists a layer that is not \"full_attention\"; sliding-window layers are not supported");
      }
    }
  }
  if (type == "mistral" || type == "llama") {
    int window = 0;
    if (type == "mistral") window = 4096;  // MistralConfig's default when the key is absent
    if (j.contains("sliding_window")) {
      if (j["sliding_window"].is_null()) {
        window = 0;
      } else {
        FERRY_ASSIGN_OR_RETURN(window, PositiveInt(j, source, "sliding_window"));
      }
    }
    if (window > 0 && window < c.max_positions) c.max_positions = window;
  }

  FERRY_ASSIGN_OR_RETURN(std::vector<int> bos, TokenIds(j, source, "bos_token_id"));
  FERRY_ASSIGN_OR_RETURN(c.eos_token_ids, TokenIds(j, source, "eos_token_id"));
  FERRY_ASSIGN_OR_RETURN(std::vector<int> pad, TokenIds(j, source, "pad_token_id"));
  const bool llama_defaults = type == "llama" || type == "mistral";
  c.bos_token_id = !bos.empty() ? bos.front() : llama_defaults ? 1 : -1;
  if (c.eos_token_ids.empty() && llama_defaults) c.eos_token_ids = {2};
  c.pad_token_id = pad.empty() ? -1 : pad.front();
  return c;
}

}  // namespace

const Family& LlamaFamily() {
  static const Family family = {
      "llama",
      {"llama", "mistral", "qwen2", "qwen3"},
      {"model."},
      {{Role::kTokEmbed, "embed_tokens.weight"},
       {Role::kFinalNorm, "norm.weight"},
       {Role::kLmHead, "lm_head.weight", true},
       {Role::kAttnNorm, "layers.{L}.input_layernorm.weight"},
       {Role::kQ, "layers.{L}.self_attn.q_proj.weight"},
       {Role::kQBias, "layers.{L}.self_attn.q_proj.bias"},
       {Role::kK, "layers.{L}.self_attn.k_proj.weight"},
       {Role::kKBias, "layers.{L}.self_attn.k_proj.bias"},
       {Role::kV, "layers.{L}.self_attn.v_proj.weight"},
       {Role::kVBias, "layers.{L}.self_attn.v_proj.bias"},
       {Role::kO, "layers.{L}.self_attn.o_proj.weight"},
       {Role::kOBias, "layers.{L}.self_attn.o_proj.bias"},
       {Role::kQNorm, "layers.{L}.self_attn.q_norm.weight"},
       {Role::kKNorm, "layers.{L}.self_attn.k_norm.weight"},
       {Role::kFfnNorm, "layers.{L}.post_attention_layernorm.weight"},
       {Role::kGate, "layers.{L}.mlp.gate_proj.weight"},
       {Role::kGateBias, "layers.{L}.mlp.gate_proj.bias"},
       {Role::kUp, "layers.{L}.mlp.up_proj.weight"},
       {Role::kUpBias, "layers.{L}.mlp.up_proj.bias"},
       {Role::kDown, "layers.{L}.mlp.down_proj.weight"},
       {Role::kDownBias, "layers.{L}.mlp.down_proj.bias"}},
      ParseLlama,
      // llama.cpp writes Llama and Mistral models as "llama", with Q/K rows permuted for its
      // interleaved rope; Qwen2 and Qwen3 keep the Hugging Face (NeoX) order.
      {{"llama", "llama", true}, {"qwen2", "qwen2", false}, {"qwen3", "qwen3", false}}};
  return family;
}

}  // namespace ferry::engine
