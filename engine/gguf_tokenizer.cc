// GGUF tokenizers as tokenizer.json: the vocabulary, merges (byte-level BPE) or score-ranked
// merges (SentencePiece BPE), control and user-defined tokens, llama.cpp's pre-tokenizer regexes
// by tokenizer.ggml.pre, BOS; the tokenizer then runs through Tokenizer::FromTokenizerJson.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "base/status.h"
#include "engine/tokenizer.h"
#include "engine/tokenizer_internal.h"
#include "io/gguf.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {

using nlohmann::json;
using namespace tokenizer_internal;  // NOLINT: the shared patterns and limits
namespace {

// llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) and their regexes, in order; each splits
// the pieces of the one before (tokenizers' Split with behavior Isolated). Where llama.cpp adapts
// a tokenizer.json regex, the original (which PCRE2 runs as written) is used.
struct GgufPre {
  std::vector<std::string> names;
  std::vector<std::string> patterns;
  bool ignore_merges = false;
  bool add_bos = false;  // llama.cpp's default when tokenizer.ggml.add_bos_token is absent
};

const std::vector<GgufPre>& GgufPres() {
  static const std::vector<GgufPre> pres = {
      {{"gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "mpt", "olmo", "jais", "gigachat", "mellum", "a.x-4.0",
        "trillion", "granite-docling"},
       {kGpt2Pattern}},
      {{"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"}, {kLlama3Pattern}, true, true},
      {{"dbrx", "smaug-bpe"}, {kLlama3Pattern}},
      {{"qwen2", "deepseek-r1-qwen", "stablelm2", "kormo"}, {kQwen2Pattern}},
      {{"qwen35"},
       {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}, {kDigitPattern, kGpt2Pattern}},
      {{"chatglm-bpe"},
       {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"falcon"},
       {R"([\p{P}\$\+<=>\^~\|`]+)", R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))", "[0-9][0-9][0-9]"}},
      {{"default"},
       {R"([\p{P}\$\+<=>\^~\|]+)", R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))", R"(\p{N}+)",
        "[0-9][0-9][0-9]"}},
      {{"deepseek-coder"}, {"[\r\n]", R"(\s?\p{L}+)", R"(\s?\p{P}+)", R"([\x{4e00}-\x{9fa5}\x{0800}-\x{4e00}\x{ac00}-\x{d7ff}]+)", R"(\p{N})"}},
      {{"poro-chat", "bloom", "gpt3-finnish"}, {R"( ?[^(\s|.,!?…。，、।۔،)]+)"}},
      {{"viking"}, {R"( ?[^(\s|.,!?…。，、।۔،)]+)", R"(\p{N})"}},
      {{"gpt-4o", "llama4"},
       {R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
      {{"tekken"},
       {R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}},
  };
  return pres;
}

}  // namespace

// An added token of a GGUF vocabulary (control: special; user-defined: not), as tokenizers writes it.
static json AddedTokenJson(size_t id, const std::string& content, bool special) {
  return {{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
          {"normalized", false}, {"special", special}};
}

// The BOS template of a GGUF vocabulary (tokenizer.ggml.add_bos_token, else `add_bos_default`);
// an EOS after every prompt (add_eos_token) is refused.
static absl::Status SetGgufPostProcessor(const io::GgufFile& f, const std::vector<std::string>& tokens, bool add_bos_default, json* tj) {
  const std::string where = f.path() + ": ";
  bool add_bos = add_bos_default;
  if (f.Find("tokenizer.ggml.add_bos_token") != nullptr) {
    FERRY_ASSIGN_OR_RETURN(add_bos, f.Bool("tokenizer.ggml.add_bos_token"));
  }
  if (f.Find("tokenizer.ggml.add_eos_token") != nullptr) {
    FERRY_ASSIGN_OR_RETURN(const bool add_eos, f.Bool("tokenizer.ggml.add_eos_token"));
    if (add_eos) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "tokenizer.ggml.add_eos_token is true (an EOS after every prompt), which ferry does not support for generation"));
    }
  }
  if (!add_bos) return absl::OkStatus();
  FERRY_ASSIGN_OR_RETURN(const uint64_t bos, f.Uint("tokenizer.ggml.bos_token_id"));
  if (bos >= tokens.size()) return absl::InvalidArgumentError(absl::StrCat(where, "tokenizer.ggml.bos_token_id ", bos, " is outside the vocabulary"));
  const std::string& content = tokens[bos];
  (*tj)["post_processor"] = {{"type", "TemplateProcessing"},
                             {"single", {{{"SpecialToken", {{"id", content}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                             {"pair", {{{"SpecialToken", {{"id", content}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                       {{"SpecialToken", {{"id", content}, {"type_id", 1}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
                             {"special_tokens", {{content, {{"id", content}, {"ids", {bos}}, {"tokens", {content}}}}}}};
  return absl::OkStatus();
}

// tokenizer.ggml.model "llama" (SentencePiece BPE: Llama 2, Mistral, TinyLlama): llama.cpp merges
// the adjacent pair whose concatenation is a token with the highest score, leftmost first, and
// spells characters without a token as <0xXX> byte tokens. As tokenizer.json: every split of a
// token into two tokens is a merge, ranked by the token's score (equal scores, equal ranks, so the
// leftmost pair wins as in llama.cpp); a space is prefixed to each text run (add_space_prefix) and
// spaces become U+2581.
absl::StatusOr<std::string> SpmTokenizerJsonFromGguf(const io::GgufFile& f) {
  const std::string where = f.path() + ": ";
  FERRY_ASSIGN_OR_RETURN(const std::vector<std::string>* tokens, f.Strings("tokenizer.ggml.tokens"));
  FERRY_ASSIGN_OR_RETURN(const std::vector<double>* scores, f.Floats("tokenizer.ggml.scores"));
  FERRY_ASSIGN_OR_RETURN(const std::vector<int64_t>* types, f.Ints("tokenizer.ggml.token_type"));
  if (scores->size() != tokens->size() || types->size() != tokens->size()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "tokenizer.ggml.scores / token_type do not have one entry per token"));
  }
  if (tokens->size() >= static_cast<size_t>(kMaxTokenId)) return absl::InvalidArgumentError(absl::StrCat(where, "vocabulary too large"));
  json vocab = json::object(), added = json::array();
  absl::flat_hash_map<std::string, int> ids;
  for (size_t id = 0; id < tokens->size(); ++id) {
    const std::string& t = (*tokens)[id];
    if (FindInvalidUtf8(t) != std::string::npos) return absl::InvalidArgumentError(absl::StrCat(where, "token ", id, " is not valid UTF-8"));
    const int64_t type = (*types)[id];
    if (type == 3 || type == 4) {
      added.push_back(AddedTokenJson(id, t, type == 3));
    }
    if (!vocab.contains(t)) {
      vocab[t] = id;
      if (type != 3 && type != 4) ids.emplace(t, static_cast<int>(id));
    }
  }
  // Merges: (score desc) over every split of every token into two tokens.
  struct M {
    double score;
    int id;
    std::string left, right;
  };
  std::vector<M> merges;
  for (size_t id = 0; id < tokens->size(); ++id) {
    const std::string& t = (*tokens)[id];
    const int64_t type = (*types)[id];
    if (type == 3 || type == 4 || type == 6) continue;
    for (size_t k = NextCodePoint(t, 0); k < t.size(); k = NextCodePoint(t, k)) {
      const std::string l = t.substr(0, k), r = t.substr(k);
      if (ids.contains(l) && ids.contains(r)) merges.push_back({(*scores)[id], static_cast<int>(id), l, r});
    }
  }
  std::stable_sort(merges.begin(), merges.end(), [](const M& a, const M& b) { return a.score > b.score; });
  json mj = json::array(), ranks = json::array();
  int rank = -1;
  for (size_t i = 0; i < merges.size(); ++i) {
    if (i == 0 || merges[i].score != merges[i - 1].score) ++rank;
    mj.push_back(json::array({merges[i].left, merges[i].right}));
    ranks.push_back(rank);
  }
  bool space_prefix = true;
  if (f.Find("tokenizer.ggml.add_space_prefix") != nullptr) {
    FERRY_ASSIGN_OR_RETURN(space_prefix, f.Bool("tokenizer.ggml.add_space_prefix"));
  }
  json normalizers = json::array();
  if (space_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", "\xe2\x96\x81"}});
  normalizers.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xe2\x96\x81"}});
  json decoders = json::array({json{{"type", "Replace"}, {"pattern", {{"String", "\xe2\x96\x81"}}}, {"content", " "}},
                               json{{"type", "ByteFallback"}}, json{{"type", "Fuse"}}});
  if (space_prefix) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  std::string unk;
  if (f.Find("tokenizer.ggml.unknown_token_id") != nullptr) {
    FERRY_ASSIGN_OR_RETURN(const uint64_t u, f.Uint("tokenizer.ggml.unknown_token_id"));
    if (u >= tokens->size()) return absl::InvalidArgumentError(absl::StrCat(where, "tokenizer.ggml.unknown_token_id is outside the vocabulary"));
    unk = (*tokens)[u];
  }
  json tj = {{"version", "1.0"},
             {"truncation", nullptr},
             {"padding", nullptr},
             {"added_tokens", added},
             {"normalizer", {{"type", "Sequence"}, {"normalizers", normalizers}}},
             {"pre_tokenizer", nullptr},
             {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}}};
  tj["model"] = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", unk.empty() ? json(nullptr) : json(unk)},
                 {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", true}, {"byte_fallback", true},
                 {"ignore_merges", false}, {"vocab", vocab}, {"merges", mj}, {"ferry_merge_ranks", ranks}};
  FERRY_RETURN_IF_ERROR(SetGgufPostProcessor(f, *tokens, true, &tj));
  return tj.dump();
}

absl::StatusOr<std::string> TokenizerJsonFromGguf(const io::GgufFile& f) {
  const std::string where = f.path() + ": ";
  FERRY_ASSIGN_OR_RETURN(const std::string model, f.String("tokenizer.ggml.model"));
  if (model == "llama") return SpmTokenizerJsonFromGguf(f);
  if (model != "gpt2") {
    return absl::InvalidArgumentError(absl::StrCat(where, "tokenizer.ggml.model \"", model,
                                                   "\" is not supported (ferry reads \"gpt2\", byte-level BPE, and \"llama\", SentencePiece BPE)"));
  }
  std::string pre_name = "default";
  if (f.Find("tokenizer.ggml.pre") != nullptr) {
    FERRY_ASSIGN_OR_RETURN(pre_name, f.String("tokenizer.ggml.pre"));
  }
  const GgufPre* pre = nullptr;
  for (const GgufPre& p : GgufPres()) {
    if (std::find(p.names.begin(), p.names.end(), pre_name) != p.names.end()) pre = &p;
  }
  if (pre == nullptr) return absl::InvalidArgumentError(absl::StrCat(where, "tokenizer.ggml.pre \"", pre_name, "\" is not supported"));
  FERRY_ASSIGN_OR_RETURN(const std::vector<std::string>* tokens, f.Strings("tokenizer.ggml.tokens"));
  FERRY_ASSIGN_OR_RETURN(const std::vector<std::string>* merges, f.Strings("tokenizer.ggml.merges"));
  const std::vector<int64_t>* types = nullptr;
  if (f.Find("tokenizer.ggml.token_type") != nullptr) {
    FERRY_ASSIGN_OR_RETURN(types, f.Ints("tokenizer.ggml.token_type"));
    if (types->size() != tokens->size()) {
      return absl::InvalidArgumentError(absl::StrCat(where, "tokenizer.ggml.token_type has ", types->size(), " entries for ", tokens->size(), " tokens"));
    }
  }
  if (tokens->size() >= static_cast<size_t>(kMaxTokenId)) return absl::InvalidArgumentError(absl::StrCat(where, "vocabulary of ", tokens->size(), " tokens is too large"));
  json vocab = json::object(), added = json::array();
  for (size_t id = 0; id < tokens->size(); ++id) {
    const std::string& t = (*tokens)[id];
    if (FindInvalidUtf8(t) != std::string::npos) return absl::InvalidArgumentError(absl::StrCat(where, "token ", id, " is not valid UTF-8"));
    const int64_t type = types ? (*types)[id] : 1;
    if (type == 3 || type == 4) {  // control, user-defined: literal text split out before pre-tokenizing
      added.push_back(AddedTokenJson(id, t, type == 3));
    }
    if (!vocab.contains(t)) vocab[t] = id;
  }
  json pretok = {{"type", "Sequence"}, {"pretokenizers", json::array()}};
  for (const std::string& pattern : pre->patterns) {
    pretok["pretokenizers"].push_back({{"type", "Split"}, {"pattern", {{"Regex", pattern}}}, {"behavior", "Isolated"}, {"invert", false}});
  }
  pretok["pretokenizers"].push_back({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}, {"trim_offsets", false}});
  // tokenizers needs every field of the BPE model
  json bpe = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
              {"end_of_word_suffix", nullptr}, {"fuse_unk", false}};
  json tj = {{"version", "1.0"},
             {"model", bpe},
             {"added_tokens", added},
             {"normalizer", nullptr},
             {"pre_tokenizer", pretok},
             {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}},
             {"truncation", nullptr},
             {"padding", nullptr}};
  tj["model"]["vocab"] = vocab;
  tj["model"]["merges"] = *merges;
  tj["model"]["ignore_merges"] = pre->ignore_merges;
  tj["model"]["byte_fallback"] = false;
  FERRY_RETURN_IF_ERROR(SetGgufPostProcessor(f, *tokens, pre->add_bos, &tj));
  return tj.dump();
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const io::GgufFile& file) {
  FERRY_ASSIGN_OR_RETURN(const std::string text, TokenizerJsonFromGguf(file));
  auto tok = FromTokenizerJson(text);
  if (!tok.ok()) return absl::Status(tok.status().code(), absl::StrCat(file.path(), " (tokenizer from GGUF metadata): ", tok.status().message()));
  return tok;
}


}  // namespace ferry::engine
