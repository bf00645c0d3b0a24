#include "engine/opt_config.h"

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using nlohmann::json;

absl::Status Refuse(const std::string& source, const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": \"", field, "\" ", why));
}

absl::StatusOr<int> PositiveInt(const json& j, const std::string& source, const char* field) {
  if (!j.contains(field)) return Refuse(source, field, "is missing");
  if (!j[field].is_number_integer() || j[field].get<int64_t>() <= 0 || j[field].get<int64_t>() > (1 << 30)) {
    return Refuse(source, field, "must be a positive integer");
  }
  return static_cast<int>(j[field].get<int64_t>());
}

absl::StatusOr<bool> OptionalBool(const json& j, const std::string& source, const char* field, bool fallback) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  if (!j[field].is_boolean()) return Refuse(source, field, "must be true or false");
  return j[field].get<bool>();
}

int OptionalInt(const json& j, const char* field, int fallback) {
  if (j.contains(field) && j[field].is_number_integer()) return j[field].get<int>();
  return fallback;
}

}  // namespace

absl::StatusOr<OptConfig> OptConfig::FromJson(const std::string& json_text, const std::string& source) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": malformed JSON (expected an object)"));
  }
  if (!j.contains("model_type") || !j["model_type"].is_string()) return Refuse(source, "model_type", "is missing");
  const std::string model_type = j["model_type"].get<std::string>();
  if (model_type != "opt") {
    return Refuse(source, "model_type", absl::StrCat("is \"", model_type, "\"; ferry supports \"opt\""));
  }
  OptConfig c;
  FERRY_ASSIGN_OR_RETURN(c.hidden_size, PositiveInt(j, source, "hidden_size"));
  FERRY_ASSIGN_OR_RETURN(c.ffn_dim, PositiveInt(j, source, "ffn_dim"));
  FERRY_ASSIGN_OR_RETURN(c.num_heads, PositiveInt(j, source, "num_attention_heads"));
  FERRY_ASSIGN_OR_RETURN(c.num_layers, PositiveInt(j, source, "num_hidden_layers"));
  FERRY_ASSIGN_OR_RETURN(c.vocab_size, PositiveInt(j, source, "vocab_size"));
  FERRY_ASSIGN_OR_RETURN(c.max_positions, PositiveInt(j, source, "max_position_embeddings"));
  if (c.hidden_size % c.num_heads != 0) {
    return Refuse(source, "num_attention_heads", absl::StrCat("(", c.num_heads, ") must divide hidden_size (", c.hidden_size, ")"));
  }
  c.word_embed_proj_dim = c.hidden_size;
  if (j.contains("word_embed_proj_dim") && !j["word_embed_proj_dim"].is_null()) {
    FERRY_ASSIGN_OR_RETURN(c.word_embed_proj_dim, PositiveInt(j, source, "word_embed_proj_dim"));
  }
  FERRY_ASSIGN_OR_RETURN(c.layer_norm_before, OptionalBool(j, source, "do_layer_norm_before", true));
  FERRY_ASSIGN_OR_RETURN(bool remove_final, OptionalBool(j, source, "_remove_final_layer_norm", false));
  c.final_layer_norm = c.layer_norm_before && !remove_final;
  FERRY_ASSIGN_OR_RETURN(c.enable_bias, OptionalBool(j, source, "enable_bias", true));
  FERRY_ASSIGN_OR_RETURN(c.tie_word_embeddings, OptionalBool(j, source, "tie_word_embeddings", true));
  FERRY_ASSIGN_OR_RETURN(bool affine, OptionalBool(j, source, "layer_norm_elementwise_affine", true));
  if (!affine) return Refuse(source, "layer_norm_elementwise_affine", "false is not supported");
  const std::string act = j.value("activation_function", std::string("relu"));
  if (act != "relu") return Refuse(source, "activation_function", absl::StrCat("is \"", act, "\"; ferry supports \"relu\""));
  c.bos_token_id = OptionalInt(j, "bos_token_id", 2);
  c.eos_token_id = OptionalInt(j, "eos_token_id", 2);
  c.pad_token_id = OptionalInt(j, "pad_token_id", 1);
  for (int id : {c.bos_token_id, c.eos_token_id}) {
    if (id < 0 || id >= c.vocab_size) return Refuse(source, "bos_token_id/eos_token_id", "is outside the vocabulary");
  }
  return c;
}

absl::StatusOr<OptConfig> OptConfig::FromModelDir(const std::string& dir) {
  const std::string path = dir + "/config.json";
  FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return FromJson(text, path);
}

}  // namespace ferry::engine
