// Tokenizer::FromTokenizerJson: a Hugging Face tokenizer.json (model, added tokens, normalizer,
// pre-tokenizer, decoder, post-processor) into a Tokenizer::Impl, every field checked.
#include <cstring>
#include <string>

#include "base/json.h"
#include "engine/tokenizer_impl.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {

using nlohmann::json;
using namespace tokenizer_internal;  // NOLINT: the shared patterns, limits and helpers

namespace {

// Checked readers of tokenizer.json: a field of the wrong type or an id out of range is one clear
// kInvalidArgument naming the field, never an exception or a silent truncation.

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: \"", field, "\" ", why));
}

absl::StatusOr<std::string> StringField(const json& j, const char* key, const std::string& fallback, const std::string& where) {
  if (!j.is_object() || !j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_string()) return Bad(where + key, "must be a string");
  return j[key].get<std::string>();
}

absl::StatusOr<bool> BoolField(const json& j, const char* key, bool fallback, const std::string& where) {
  if (!j.is_object() || !j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) return Bad(where + key, "must be true or false");
  return j[key].get<bool>();
}

absl::StatusOr<int> TokenId(const json& v, const std::string& where) {
  if (!v.is_number_integer()) return Bad(where, "must be an integer token id");
  if (v.is_number_unsigned() ? v.get<uint64_t>() >= static_cast<uint64_t>(kMaxTokenId) : (v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxTokenId)) {
    return Bad(where, absl::StrCat("is ", v.dump(), ", outside [0, ", kMaxTokenId, ")"));
  }
  return static_cast<int>(v.get<int64_t>());
}

// The pattern of a Split pre-tokenizer: {"Regex": r} as is, {"String": s} escaped.
absl::StatusOr<std::string> SplitPattern(const json& p, const std::string& where) {
  if (!p.is_object() || !p.contains("pattern") || !p["pattern"].is_object()) return Bad(where + "pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
  const json& pat = p["pattern"];
  if (pat.contains("Regex") && pat["Regex"].is_string()) return pat["Regex"].get<std::string>();
  if (pat.contains("String") && pat["String"].is_string()) {
    std::string out;
    for (char c : pat["String"].get<std::string>()) {
      if (std::strchr("\\^$.|?*+()[]{}-#", c) != nullptr && c != '\0') out.push_back('\\');
      out.push_back(c);
    }
    return out;
  }
  return Bad(where + "pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
}

absl::StatusOr<SplitBehavior> Behavior(const json& p, const std::string& where, SplitBehavior fallback) {
  FERRY_ASSIGN_OR_RETURN(const std::string b, StringField(p, "behavior", "", where));
  if (b.empty()) return fallback;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  return Bad(where + "behavior", absl::StrCat("\"", b, "\" is not a split behavior"));
}

// A Replace normalizer's or decoder's {"pattern": {"String": p}, "content": c}: (p, c), p non-empty.
absl::StatusOr<std::pair<std::string, std::string>> ReplaceSpec(const json& x, const std::string& where, const char* pattern_note) {
  if (!x.contains("pattern") || !x["pattern"].is_object() || !x["pattern"].contains("String") || !x["pattern"]["String"].is_string()) {
    return Bad(where + ".pattern", absl::StrCat("must be {\"String\": ...}", pattern_note));
  }
  FERRY_ASSIGN_OR_RETURN(std::string content, StringField(x, "content", "", where + "."));
  std::string pattern = x["pattern"]["String"].get<std::string>();
  if (pattern.empty()) return Bad(where + ".pattern", "must not be empty");
  return std::make_pair(std::move(pattern), std::move(content));
}

}  // namespace

// pre_tokenizer: ByteLevel (with or without its regex), Split, Digits, Punctuation, Sequence;
// anything else is refused by name.
static absl::Status ParsePreTokenizer(const json& p, Tokenizer::Impl* impl, bool* byte_level, const std::string& where, int depth = 0) {
  if (!p.is_object()) return Bad(where, "must be an object");
  if (depth > 8) return Bad(where, "nests Sequences too deeply");
  FERRY_ASSIGN_OR_RETURN(const std::string type, StringField(p, "type", "", where + "."));
  if (type == "Sequence") {
    if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array()) return Bad(where + ".pretokenizers", "must be a list");
    for (const json& q : p["pretokenizers"]) FERRY_RETURN_IF_ERROR(ParsePreTokenizer(q, impl, byte_level, where + ".pretokenizers[]", depth + 1));
    return absl::OkStatus();
  }
  if (*byte_level) return Bad(where, absl::StrCat("has \"", type, "\" after ByteLevel, which ferry does not support"));
  if (type == "ByteLevel") {
    FERRY_ASSIGN_OR_RETURN(const bool prefix_space, BoolField(p, "add_prefix_space", false, where + "."));
    FERRY_ASSIGN_OR_RETURN(const bool use_regex, BoolField(p, "use_regex", true, where + "."));
    if (prefix_space && !impl->steps.empty()) {
      return Bad(where + ".add_prefix_space", "is supported only when ByteLevel is the first pre-tokenizer");
    }
    impl->add_prefix_space = prefix_space;
    *byte_level = true;
    if (use_regex) return impl->AddStep(kGpt2Pattern, SplitBehavior::kIsolated, false);
    return absl::OkStatus();
  }
  if (type == "Metaspace") {
    if (!impl->steps.empty() || impl->metaspace) return Bad(where, "has Metaspace after another pre-tokenizer, which ferry does not support");
    FERRY_ASSIGN_OR_RETURN(impl->meta, StringField(p, "replacement", "\xe2\x96\x81", where + "."));
    if (impl->meta.empty()) return Bad(where + ".replacement", "must not be empty");
    FERRY_ASSIGN_OR_RETURN(const std::string scheme, StringField(p, "prepend_scheme", "always", where + "."));
    FERRY_ASSIGN_OR_RETURN(const bool prefix_space, BoolField(p, "add_prefix_space", true, where + "."));
    if (scheme == "always") {
      impl->meta_scheme = prefix_space ? 0 : 2;
    } else if (scheme == "first") {
      impl->meta_scheme = 1;
    } else if (scheme == "never") {
      impl->meta_scheme = 2;
    } else {
      return Bad(where + ".prepend_scheme", absl::StrCat("\"", scheme, "\" is not always, first or never"));
    }
    impl->metaspace = true;
    FERRY_ASSIGN_OR_RETURN(const bool split, BoolField(p, "split", true, where + "."));
    if (split) {
      const std::string pattern = absl::StrCat("\\Q", impl->meta, "\\E");  // the replacement, literally
      return impl->AddStep(pattern, SplitBehavior::kMergedWithNext, false);
    }
    return absl::OkStatus();
  }
  if (type == "Split") {
    FERRY_ASSIGN_OR_RETURN(const std::string pattern, SplitPattern(p, where + "."));
    FERRY_ASSIGN_OR_RETURN(const SplitBehavior behavior, Behavior(p, where + ".", SplitBehavior::kIsolated));
    FERRY_ASSIGN_OR_RETURN(const bool invert, BoolField(p, "invert", false, where + "."));
    return impl->AddStep(pattern, behavior, invert);
  }
  if (type == "Digits") {
    FERRY_ASSIGN_OR_RETURN(const bool individual, BoolField(p, "individual_digits", false, where + "."));
    return impl->AddStep(individual ? kDigitPattern : kDigitsPattern, SplitBehavior::kIsolated, false);
  }
  if (type == "Punctuation") {
    FERRY_ASSIGN_OR_RETURN(const SplitBehavior behavior, Behavior(p, where + ".", SplitBehavior::kIsolated));
    return impl->AddStep(kPunctuationPattern, behavior, false);
  }
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: pre-tokenizer \"", type, "\" is not supported"));
}

// normalizer: NFC, NFKC, NFD, NFKD (utf8proc), Lowercase, Prepend, Replace (string patterns),
// Strip, Sequence; the rest are refused by name.
static absl::Status ParseNormalizer(const json& n, Tokenizer::Impl* impl, const std::string& where, int depth = 0) {
  if (!n.is_object()) return Bad(where, "must be an object");
  if (depth > 8) return Bad(where, "nests Sequences too deeply");
  FERRY_ASSIGN_OR_RETURN(const std::string type, StringField(n, "type", "", where + "."));
  using N = Tokenizer::Impl::Normalizer;
  if (type == "Sequence") {
    if (!n.contains("normalizers") || !n["normalizers"].is_array()) return Bad(where + ".normalizers", "must be a list");
    for (const json& q : n["normalizers"]) FERRY_RETURN_IF_ERROR(ParseNormalizer(q, impl, where + ".normalizers[]", depth + 1));
    return absl::OkStatus();
  }
  if (type == "Prepend") {
    FERRY_ASSIGN_OR_RETURN(const std::string prepend, StringField(n, "prepend", "", where + "."));
    impl->normalizers.push_back({N::kPrepend, prepend, ""});
    impl->cut_safe = false;  // once per text, not per parallel chunk
    return absl::OkStatus();
  }
  if (type == "Replace") {
    FERRY_ASSIGN_OR_RETURN(const auto replace, ReplaceSpec(n, where, " (regex patterns are not supported)"));
    impl->normalizers.push_back({N::kReplace, replace.first, replace.second});
    return absl::OkStatus();
  }
  if (type == "NFC" || type == "NFKC" || type == "NFD" || type == "NFKD") {
    N u{N::kUnicode, "", ""};
    const bool compose = type == "NFC" || type == "NFKC", compat = type == "NFKC" || type == "NFKD";
    u.utf8proc_options = UTF8PROC_STABLE | (compose ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) | (compat ? UTF8PROC_COMPAT : 0);
    impl->normalizers.push_back(u);
    return absl::OkStatus();
  }
  if (type == "Lowercase") {
    impl->normalizers.push_back({N::kLowercase, "", ""});
    return absl::OkStatus();
  }
  if (type == "Strip") {
    N s{N::kStrip, "", ""};
    FERRY_ASSIGN_OR_RETURN(s.left, BoolField(n, "strip_left", true, where + "."));
    FERRY_ASSIGN_OR_RETURN(s.right, BoolField(n, "strip_right", true, where + "."));
    impl->normalizers.push_back(s);
    impl->cut_safe = false;  // the ends of the text, not of each parallel chunk
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: normalizer \"", type, "\" is not supported"));
}

// decoder: ByteLevel on a byte-level vocabulary; Replace, ByteFallback, Fuse, Strip, Metaspace
// and Sequence on a SentencePiece-style one.
static absl::Status ParseDecoder(const json& d, Tokenizer::Impl* impl, bool byte_level, const std::string& where, int depth = 0) {
  if (!d.is_object()) return Bad(where, "must be an object");
  if (depth > 8) return Bad(where, "nests Sequences too deeply");
  FERRY_ASSIGN_OR_RETURN(const std::string type, StringField(d, "type", "", where + "."));
  using D = Tokenizer::Impl::Decoder;
  if (type == "Sequence") {
    if (!d.contains("decoders") || !d["decoders"].is_array()) return Bad(where + ".decoders", "must be a list");
    for (const json& q : d["decoders"]) FERRY_RETURN_IF_ERROR(ParseDecoder(q, impl, byte_level, where + ".decoders[]", depth + 1));
    return absl::OkStatus();
  }
  if (byte_level) {
    if (type == "ByteLevel") return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: decoder \"", type, "\" is not supported with a byte-level vocabulary"));
  }
  if (type == "Replace") {
    FERRY_ASSIGN_OR_RETURN(const auto replace, ReplaceSpec(d, where, ""));
    impl->decoders.push_back({D::kReplace, replace.first, replace.second});
    return absl::OkStatus();
  }
  if (type == "ByteFallback") {
    impl->decoders.push_back({D::kByteFallback, "", ""});
    return absl::OkStatus();
  }
  if (type == "Fuse") {
    impl->decoders.push_back({D::kFuse, "", ""});
    return absl::OkStatus();
  }
  if (type == "Strip") {
    D s{D::kStrip, "", ""};
    FERRY_ASSIGN_OR_RETURN(s.a, StringField(d, "content", " ", where + "."));
    for (auto [key, out] : {std::pair{"start", &s.start}, std::pair{"stop", &s.stop}}) {
      if (!d.contains(key)) continue;
      if (!d[key].is_number_unsigned() || d[key].get<uint64_t>() > 1024) return Bad(where + "." + key, "must be a small count");
      *out = static_cast<int>(d[key].get<uint64_t>());
    }
    if (s.a.empty()) return Bad(where + ".content", "must not be empty");
    impl->decoders.push_back(s);
    return absl::OkStatus();
  }
  if (type == "Metaspace") {
    D s{D::kMetaspace, "", ""};
    FERRY_ASSIGN_OR_RETURN(s.a, StringField(d, "replacement", "\xe2\x96\x81", where + "."));
    FERRY_ASSIGN_OR_RETURN(const std::string scheme, StringField(d, "prepend_scheme", "always", where + "."));
    s.start = scheme != "never";
    if (s.a.empty()) return Bad(where + ".replacement", "must not be empty");
    impl->decoders.push_back(s);
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: decoder \"", type, "\" is not supported"));
}

// post_processor: TemplateProcessing (special tokens before the text become the prefix, after it
// the suffix), RobertaProcessing / BertProcessing (cls first, sep last), ByteLevel (nothing to
// add), Sequence of those.
static absl::Status ParsePostProcessor(const json& pp, Tokenizer::Impl* impl, int max_id, int depth = 0) {
  if (!pp.is_object()) return Bad("post_processor", "must be an object");
  if (depth > 8) return Bad("post_processor", "nests Sequences too deeply");
  FERRY_ASSIGN_OR_RETURN(const std::string type, StringField(pp, "type", "", "post_processor."));
  if (type == "Sequence") {
    if (!pp.contains("processors") || !pp["processors"].is_array()) return Bad("post_processor.processors", "must be a list");
    for (const json& q : pp["processors"]) FERRY_RETURN_IF_ERROR(ParsePostProcessor(q, impl, max_id, depth + 1));
    return absl::OkStatus();
  }
  if (type == "ByteLevel") return absl::OkStatus();
  if (type == "RobertaProcessing" || type == "BertProcessing") {  // cls text sep
    for (auto [key, out] : {std::pair{"cls", &impl->prefix}, std::pair{"sep", &impl->suffix}}) {
      if (!pp.contains(key) || !pp[key].is_array() || pp[key].size() != 2) return Bad(std::string("post_processor.") + key, "must be [token, id]");
      FERRY_ASSIGN_OR_RETURN(const int v, TokenId(pp[key][1], std::string("post_processor.") + key + "[1]"));
      if (v > max_id) return Bad(std::string("post_processor.") + key, "is not in the vocabulary");
      out->push_back(v);
    }
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: \"post_processor.type\" \"", type, "\" is not supported"));
  }
  if (!pp.contains("single") || !pp["single"].is_array()) return Bad("post_processor.single", "must be a list");
  bool after_text = false;
  for (const auto& piece : pp["single"]) {
    if (!piece.is_object()) return Bad("post_processor.single[]", "must be an object");
    if (!piece.contains("SpecialToken")) {
      if (!piece.contains("Sequence")) return Bad("post_processor.single[]", "must be a SpecialToken or the Sequence");
      after_text = true;
      continue;
    }
    const json& st = piece["SpecialToken"];
    if (!st.is_object()) return Bad("post_processor.single[].SpecialToken", "must be an object");
    FERRY_ASSIGN_OR_RETURN(const std::string name, StringField(st, "id", "", "post_processor.single[].SpecialToken."));
    if (!pp.contains("special_tokens") || !pp["special_tokens"].is_object() || !pp["special_tokens"].contains(name)) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: post_processor names unknown special token \"", name, "\""));
    }
    const json& tok = pp["special_tokens"][name];
    if (!tok.is_object() || !tok.contains("ids") || !tok["ids"].is_array()) {
      return Bad(absl::StrCat("post_processor.special_tokens.", name, ".ids"), "must be a list of token ids");
    }
    for (const auto& id : tok["ids"]) {
      FERRY_ASSIGN_OR_RETURN(const int v, TokenId(id, "post_processor.special_tokens." + name + ".ids[]"));
      if (v > max_id) return Bad("post_processor.special_tokens." + name + ".ids[]", "is not in the vocabulary");
      (after_text ? impl->suffix : impl->prefix).push_back(v);
    }
  }
  return absl::OkStatus();
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromTokenizerJson(const std::string& json_text) {
  if (JsonDepth(json_text) > 64) return absl::InvalidArgumentError("tokenizer.json: JSON nested deeper than 64 levels");
  json j = json::parse(json_text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: malformed JSON (expected an object with \"model\")");
  }
  const json& m = j["model"];
  FERRY_ASSIGN_OR_RETURN(const std::string model_type, StringField(m, "type", "", "model."));
  if (model_type != "BPE") return absl::InvalidArgumentError("tokenizer.json: \"model.type\" must be \"BPE\"");
  for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (m.contains(field) && !m[field].is_null() && m[field] != "") {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: \"model.", field, "\" is not supported"));
    }
  }
  auto impl = std::make_unique<Impl>();
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    FERRY_RETURN_IF_ERROR(ParseNormalizer(j["normalizer"], impl.get(), "normalizer"));
  }
  bool byte_level = false;
  if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
    FERRY_RETURN_IF_ERROR(ParsePreTokenizer(j["pre_tokenizer"], impl.get(), &byte_level, "pre_tokenizer"));
  }
  FERRY_ASSIGN_OR_RETURN(impl->ignore_merges, BoolField(m, "ignore_merges", false, "model."));
  FERRY_ASSIGN_OR_RETURN(impl->byte_fallback, BoolField(m, "byte_fallback", false, "model."));
  FERRY_ASSIGN_OR_RETURN(impl->fuse_unk, BoolField(m, "fuse_unk", false, "model."));
  if (m.contains("dropout") && !m["dropout"].is_null()) return absl::InvalidArgumentError("tokenizer.json: \"model.dropout\" is not supported");
  // Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) or SentencePiece-style BPE on text (Llama 2,
  // Mistral, TinyLlama, Gemma: byte fallback, a Metaspace or normalizer marking spaces).
  impl->spm = !byte_level;
  if (impl->spm && !impl->byte_fallback && !impl->metaspace && impl->normalizers.empty()) {
    return absl::InvalidArgumentError(
        "tokenizer.json: neither a ByteLevel pre-tokenizer nor SentencePiece-style BPE (byte_fallback, Metaspace or a normalizer)");
  }
  if (byte_level && impl->byte_fallback) {
    return absl::InvalidArgumentError("tokenizer.json: \"model.byte_fallback\" is not supported with a byte-level vocabulary");
  }
  if (j.contains("decoder") && !j["decoder"].is_null()) {
    FERRY_RETURN_IF_ERROR(ParseDecoder(j["decoder"], impl.get(), byte_level, "decoder"));
  }
  if (!m.contains("vocab") || !m["vocab"].is_object() || !m.contains("merges") || !m["merges"].is_array()) {
    return absl::InvalidArgumentError("tokenizer.json: \"model.vocab\" and \"model.merges\" are required");
  }
  absl::flat_hash_map<int, int> cp_to_byte;
  const auto b2c = ByteToCodePoint();
  for (int b = 0; b < 256; ++b) cp_to_byte[b2c[b]] = b;

  int max_id = -1;
  std::vector<std::pair<std::string, int>> entries;
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    FERRY_ASSIGN_OR_RETURN(const int id, TokenId(it.value(), "model.vocab[" + it.key() + "]"));
    entries.emplace_back(it.key(), id);
    max_id = std::max(max_id, id);
  }
  struct AddedEntry {
    std::string content;
    int id;
    bool special, lstrip, rstrip;
  };
  std::vector<AddedEntry> added_tokens;
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) return Bad("added_tokens", "must be a list");
    for (const auto& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a.contains("content") || !a["content"].is_string()) {
        return absl::InvalidArgumentError("tokenizer.json: each added token needs \"id\" and \"content\"");
      }
      FERRY_ASSIGN_OR_RETURN(const int id, TokenId(a["id"], "added_tokens[].id"));
      FERRY_ASSIGN_OR_RETURN(const bool special, BoolField(a, "special", false, "added_tokens[]."));
      FERRY_ASSIGN_OR_RETURN(const bool lstrip, BoolField(a, "lstrip", false, "added_tokens[]."));
      FERRY_ASSIGN_OR_RETURN(const bool rstrip, BoolField(a, "rstrip", false, "added_tokens[]."));
      FERRY_ASSIGN_OR_RETURN(const bool single_word, BoolField(a, "single_word", false, "added_tokens[]."));
      if (single_word) return Bad("added_tokens[].single_word", "true is not supported");
      // Tokens matched in the normalized text (normalized: true) differ from raw-text matching only
      // when there is a normalizer; ferry matches raw text, so that combination is refused.
      FERRY_ASSIGN_OR_RETURN(const bool normalized, BoolField(a, "normalized", !special, "added_tokens[]."));
      if (normalized && !impl->normalizers.empty()) {
        return Bad("added_tokens[].normalized", absl::StrCat("true (token \"", a["content"].get<std::string>(),
                                                             "\") with a normalizer is not supported"));
      }
      if (a["content"].get<std::string>().empty()) return Bad("added_tokens[].content", "must not be empty");
      added_tokens.push_back({a["content"].get<std::string>(), id, special, lstrip, rstrip});
      max_id = std::max(max_id, id);
    }
  }
  // Ids are indices into tables of max_id + 1 entries: a table much larger than the tokens is a
  // lying file, not a vocabulary.
  const int64_t tokens = static_cast<int64_t>(entries.size() + added_tokens.size());
  if (max_id >= 2 * tokens + 1024) {
    return Bad("model.vocab", absl::StrCat("has token id ", max_id, " for only ", tokens, " tokens"));
  }
  impl->id_to_bytes.assign(max_id + 1, std::string());
  impl->special.assign(max_id + 1, false);
  absl::flat_hash_map<std::string, int> added_ids;
  for (const AddedEntry& a : added_tokens) added_ids[a.content] = a.id;
  for (const auto& [tok, id] : entries) {
    if (added_ids.contains(tok)) continue;  // added tokens are literal text, not byte-level
    if (impl->spm) {
      if (FindInvalidUtf8(tok) != std::string::npos) return Bad("model.vocab", "holds a token that is not valid UTF-8");
      impl->bytes_to_id.emplace(tok, id);
      impl->id_to_bytes[id] = tok;
      continue;
    }
    auto bytes = TokenToBytes(tok, cp_to_byte);
    if (!bytes.ok()) {  // not byte-level text: no merge can produce it; it decodes as its text
      if (FindInvalidUtf8(tok) != std::string::npos) return bytes.status();
      impl->id_to_bytes[id] = tok;
      continue;
    }
    impl->bytes_to_id.emplace(*bytes, id);
    impl->id_to_bytes[id] = std::move(*bytes);
  }
  for (const AddedEntry& a : added_tokens) {
    const auto& [content, id, special, lstrip, rstrip] = a;
    impl->id_to_bytes[id] = content;
    impl->special[id] = special;
    impl->added.push_back({content, id, lstrip, rstrip});
  }
  int rank = 0;
  // ferry's own field (GGUF SentencePiece vocabularies): merges that share a rank.
  const json* ranks = nullptr;
  if (m.contains("ferry_merge_ranks")) {
    if (!m["ferry_merge_ranks"].is_array() || m["ferry_merge_ranks"].size() != m["merges"].size()) {
      return Bad("model.ferry_merge_ranks", "must list one rank per merge");
    }
    ranks = &m["ferry_merge_ranks"];
  }
  for (const auto& mg : m["merges"]) {
    std::string l, r;
    if (mg.is_string()) {
      std::vector<std::string> parts = absl::StrSplit(mg.get<std::string>(), absl::MaxSplits(' ', 1));
      if (parts.size() != 2) return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad merge \"", mg.get<std::string>(), "\""));
      l = parts[0], r = parts[1];
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      l = mg[0].get<std::string>(), r = mg[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError("tokenizer.json: merges must be \"a b\" strings or [a, b] pairs");
    }
    int r_rank = rank++;
    if (ranks != nullptr) {
      const json& rv = (*ranks)[static_cast<size_t>(r_rank)];
      if (!rv.is_number_unsigned() || rv.get<uint64_t>() > (1u << 30)) return Bad("model.ferry_merge_ranks[]", "must be a small count");
      r_rank = static_cast<int>(rv.get<uint64_t>());
    }
    FERRY_RETURN_IF_ERROR(impl->AddMerge(l, r, r_rank, cp_to_byte));
  }
  if (j.contains("post_processor") && !j["post_processor"].is_null()) {
    FERRY_RETURN_IF_ERROR(ParsePostProcessor(j["post_processor"], impl.get(), max_id));
  }
  FERRY_ASSIGN_OR_RETURN(const std::string unk, StringField(m, "unk_token", "", "model."));
  if (!unk.empty()) {
    auto it = impl->bytes_to_id.find(unk);
    auto at = added_ids.find(unk);
    if (it == impl->bytes_to_id.end() && at == added_ids.end()) return Bad("model.unk_token", "is not in the vocabulary");
    impl->unk_id = it != impl->bytes_to_id.end() ? it->second : at->second;
  }
  FERRY_RETURN_IF_ERROR(impl->Finish());
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromVocabAndMerges(const std::string& vocab_json,
                                                                         const std::string& merges_txt,
                                                                         const std::vector<std::string>& special_tokens,
                                                                         const std::string& bos_token) {
  json vocab = json::parse(vocab_json, nullptr, false);
  if (vocab.is_discarded() || !vocab.is_object()) return absl::InvalidArgumentError("vocab.json: malformed JSON");
  json tj = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}},
             {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
             {"added_tokens", json::array()}};
  for (absl::string_view line : absl::StrSplit(merges_txt, '\n')) {
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || absl::StartsWith(line, "#version")) continue;
    tj["model"]["merges"].push_back(std::string(line));
  }
  for (const std::string& s : special_tokens) {
    if (!vocab.contains(s)) return absl::InvalidArgumentError(absl::StrCat("vocab.json lacks special token \"", s, "\""));
    tj["added_tokens"].push_back({{"id", vocab[s]}, {"content", s}, {"special", true}});
  }
  if (!bos_token.empty()) {
    if (!vocab.contains(bos_token)) return absl::InvalidArgumentError(absl::StrCat("vocab.json lacks BOS token \"", bos_token, "\""));
    tj["post_processor"] = {{"type", "TemplateProcessing"},
                            {"single", {{{"SpecialToken", {{"id", bos_token}}}}, {{"Sequence", {{"id", "A"}}}}}},
                            {"special_tokens", {{bos_token, {{"ids", {vocab[bos_token]}}}}}}};
  }
  return FromTokenizerJson(tj.dump());
}


}  // namespace ferry::engine
