// The family registry, the roles a ModelConfig implies, checkpoint-name resolution, and the shared
// config.json field readers.
#include "engine/family.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"

namespace ferry::engine {

using nlohmann::json;
using offload::Role;

const std::vector<const Family*>& Families() {
  static const std::vector<const Family*> families = {&OptFamily(), &LlamaFamily()};
  return families;
}

absl::StatusOr<const Family*> FindFamily(const std::string& model_type, const std::string& source) {
  std::vector<std::string> known;
  for (const Family* f : Families()) {
    for (const std::string& t : f->model_types) {
      if (t == model_type) return f;
      known.push_back(t);
    }
  }
  return config_fields::Refuse(source, "model_type",
                               absl::StrCat("is \"", model_type, "\"; ferry supports ", absl::StrJoin(known, ", ")));
}

bool ModelConfig::is_eos(int id) const { return std::find(eos_token_ids.begin(), eos_token_ids.end(), id) != eos_token_ids.end(); }

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const std::string& json_text, const std::string& source) {
  if (JsonDepth(json_text) > 64) return absl::InvalidArgumentError(absl::StrCat(source, ": JSON nested deeper than 64 levels"));
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": malformed JSON (expected an object)"));
  }
  if (!j.contains("model_type") || !j["model_type"].is_string()) return config_fields::Refuse(source, "model_type", "is missing");
  FERRY_ASSIGN_OR_RETURN(const Family* family, FindFamily(j["model_type"].get<std::string>(), source));
  FERRY_ASSIGN_OR_RETURN(ModelConfig c, family->parse(j, source));
  c.family = family->name;
  c.model_type = j["model_type"].get<std::string>();
  FERRY_RETURN_IF_ERROR(config_fields::CheckTokenIds(c, source));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::FromModelDir(const std::string& dir) {
  const std::string path = dir + "/config.json";
  FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return FromJson(text, path);
}

offload::KvCacheSpec KvSpec(const ModelConfig& c, int rows, int max_len, KvType dtype) {
  offload::KvCacheSpec s;
  s.shape = c.kv_shape(dtype);
  s.rows = rows;
  s.max_len = max_len;
  s.query_heads = c.num_heads;
  return s;
}

std::vector<RoleSpec> GlobalRoles(const ModelConfig& c) {
  const int64_t d = c.hidden_size, w = c.word_embed_proj_dim, v = c.vocab_size;
  std::vector<RoleSpec> r = {{Role::kTokEmbed, {v, w}, true}};
  if (c.learned_positions()) r.push_back({Role::kPosEmbed, {c.max_positions + c.position_offset, d}, true});
  if (c.final_norm) {
    r.push_back({Role::kFinalNorm, {d}, false});
    if (c.norm == NormKind::kLayerNorm) r.push_back({Role::kFinalNormBias, {d}, false});
  }
  if (c.has_projection()) {
    r.push_back({Role::kProjectIn, {d, w}, true});
    r.push_back({Role::kProjectOut, {w, d}, true});
  }
  if (!c.tie_word_embeddings) r.push_back({Role::kLmHead, {v, w}, true});
  return r;
}

std::vector<RoleSpec> LayerRoles(const ModelConfig& c) {
  const int64_t d = c.hidden_size, f = c.ffn_dim, qw = c.q_width(), kw = c.kv_width(), hd = c.head_dim();
  const bool ln = c.norm == NormKind::kLayerNorm;
  std::vector<RoleSpec> r = {{Role::kAttnNorm, {d}, false}};
  if (ln) r.push_back({Role::kAttnNormBias, {d}, false});
  r.push_back({Role::kFfnNorm, {d}, false});
  if (ln) r.push_back({Role::kFfnNormBias, {d}, false});
  r.push_back({Role::kQ, {qw, d}, true});
  r.push_back({Role::kK, {kw, d}, true});
  r.push_back({Role::kV, {kw, d}, true});
  r.push_back({Role::kO, {d, qw}, true});
  if (c.qkv_bias) {
    r.push_back({Role::kQBias, {qw}, false});
    r.push_back({Role::kKBias, {kw}, false});
    r.push_back({Role::kVBias, {kw}, false});
  }
  if (c.o_bias) r.push_back({Role::kOBias, {d}, false});
  if (c.qk_norm) {
    r.push_back({Role::kQNorm, {hd}, false});
    r.push_back({Role::kKNorm, {hd}, false});
  }
  if (c.ffn == FfnKind::kSwiGlu) r.push_back({Role::kGate, {f, d}, true});
  r.push_back({Role::kUp, {f, d}, true});
  r.push_back({Role::kDown, {d, f}, true});
  if (c.ffn_bias) {
    if (c.ffn == FfnKind::kSwiGlu) r.push_back({Role::kGateBias, {f}, false});
    r.push_back({Role::kUpBias, {f}, false});
    r.push_back({Role::kDownBias, {d}, false});
  }
  return r;
}

absl::StatusOr<TensorNames> TensorNames::Resolve(const Family& family, const io::TensorSource& source) {
  for (const std::string& prefix : family.prefixes) {
    TensorNames n = WithPrefix(family, prefix);
    if (source.Find(n.Global(Role::kTokEmbed)) != nullptr) return n;
  }
  return absl::NotFoundError(absl::StrCat("checkpoint lacks the token embedding \"", family.prefixes.front(), "embed_tokens.weight\" (",
                                          family.name, " family)"));
}

TensorNames TensorNames::WithPrefix(const Family& family, const std::string& prefix) {
  TensorNames n;
  n.family_ = &family;
  n.prefix_ = prefix;
  return n;
}

std::string TensorNames::Global(Role role) const { return Layer(role, -1); }

std::string TensorNames::Layer(Role role, int layer) const {
  for (const RoleName& rn : family_->names) {
    if (rn.role != role) continue;
    const std::string name = absl::StrReplaceAll(rn.name, {{"{L}", std::to_string(layer)}});
    return rn.absolute ? name : prefix_ + name;
  }
  return "";
}

bool TensorNames::RoleOf(const std::string& name, Role* role, int* layer) const {
  for (const RoleName& rn : family_->names) {
    const std::string pattern = rn.absolute ? rn.name : prefix_ + rn.name;
    const size_t at = pattern.find("{L}");
    if (at == std::string::npos) {
      if (pattern != name) continue;
      *role = rn.role;
      *layer = -1;
      return true;
    }
    const std::string head = pattern.substr(0, at), tail = pattern.substr(at + 3);
    if (name.size() <= head.size() + tail.size() || name.compare(0, head.size(), head) != 0 ||
        name.compare(name.size() - tail.size(), tail.size(), tail) != 0) {
      continue;
    }
    const std::string digits = name.substr(head.size(), name.size() - head.size() - tail.size());
    if (digits.empty() || digits.size() > 6 || !std::all_of(digits.begin(), digits.end(), ::isdigit)) continue;
    *role = rn.role;
    *layer = std::stoi(digits);
    return true;
  }
  return false;
}

namespace config_fields {

absl::Status Refuse(const std::string& source, const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": \"", field, "\" ", why));
}

absl::StatusOr<int> PositiveInt(const json& j, const std::string& source, const char* field) {
  if (!j.contains(field) || j[field].is_null()) return Refuse(source, field, "is missing");
  if (!j[field].is_number_integer() || j[field].get<int64_t>() <= 0 || j[field].get<int64_t>() > (1 << 30)) {
    return Refuse(source, field, "must be a positive integer");
  }
  return static_cast<int>(j[field].get<int64_t>());
}

absl::StatusOr<int> OptionalPositiveInt(const json& j, const std::string& source, const char* field, int fallback) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  return PositiveInt(j, source, field);
}

absl::StatusOr<bool> OptionalBool(const json& j, const std::string& source, const char* field, bool fallback) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  if (!j[field].is_boolean()) return Refuse(source, field, "must be true or false");
  return j[field].get<bool>();
}

absl::StatusOr<double> OptionalNumber(const json& j, const std::string& source, const char* field, double fallback) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  if (!j[field].is_number() || !std::isfinite(j[field].get<double>())) return Refuse(source, field, "must be a finite number");
  return j[field].get<double>();
}

absl::StatusOr<std::vector<int>> TokenIds(const json& j, const std::string& source, const char* field) {
  std::vector<int> ids;
  if (!j.contains(field) || j[field].is_null()) return ids;
  const json& v = j[field];
  auto one = [&](const json& x) -> absl::Status {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > (1 << 30)) {
      return Refuse(source, field, "must be a token id (a non-negative integer) or a list of them");
    }
    ids.push_back(static_cast<int>(x.get<int64_t>()));
    return absl::OkStatus();
  };
  if (v.is_array()) {
    for (const json& x : v) FERRY_RETURN_IF_ERROR(one(x));
  } else {
    FERRY_RETURN_IF_ERROR(one(v));
  }
  return ids;
}

absl::Status RefuseUnknownKeys(const json& j, const std::string& source, const std::vector<std::string>& understood) {
  // Keys that describe training, provenance or other frameworks, and change nothing at inference.
  static const std::set<std::string> kIrrelevant = {
      "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache", "initializer_range",
      "attention_dropout", "dropout", "activation_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "layerdrop",
      "init_std", "scale_embedding", "is_llama_config", "transformers.js_config", "pretraining_tp", "output_attentions",
      "output_hidden_states", "return_dict", "prefix", "id2label", "label2id", "problem_type", "tokenizer_class",
      "unsloth_version", "quantization_config_disabled", "auto_map", "model_type", "bos_token_id", "eos_token_id",
      "pad_token_id", "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
      "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "early_stopping", "num_return_sequences",
      "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward",
      "decoder_start_token_id", "sep_token_id", "task_specific_params", "finetuning_task", "torchscript",
      "use_bfloat16", "pruned_heads", "cross_attention_hidden_size", "tf_legacy_loss", "use_return_dict",
      "typical_p", "diversity_penalty", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
      "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
      "num_beam_groups", "output_scores", "return_dict_in_generate", "encoder_no_repeat_ngram_size", "rope_interleaved",
      "attn_implementation", "_attn_implementation_autoset", "keys_to_ignore_at_inference"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    if (kIrrelevant.count(key) > 0 || std::find(understood.begin(), understood.end(), key) != understood.end()) continue;
    if (!key.empty() && key[0] == '_') continue;  // private bookkeeping (ferry's own _ferry_dummy among them)
    return Refuse(source, key, "is not supported by ferry (unknown to its model families, so it is refused rather than ignored)");
  }
  return absl::OkStatus();
}

absl::Status CheckTokenIds(const ModelConfig& c, const std::string& source) {
  auto bad = [&](int id) { return id < -1 || id >= c.vocab_size; };
  if (bad(c.bos_token_id)) return Refuse(source, "bos_token_id", "is outside the vocabulary");
  for (int id : c.eos_token_ids) {
    if (bad(id)) return Refuse(source, "eos_token_id", "is outside the vocabulary");
  }
  if (c.pad_token_id >= c.vocab_size) return Refuse(source, "pad_token_id", "is outside the vocabulary");
  return absl::OkStatus();
}

}  // namespace config_fields
}  // namespace ferry::engine
