#include "engine/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <queue>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using nlohmann::json;

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// GPT-2's byte -> unicode code point map (printable bytes map to themselves).
std::array<int, 256> ByteToCodePoint() {
  std::array<int, 256> map{};
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    map[b] = printable ? b : next++;
  }
  return map;
}

// Maps a byte-level token string (code points from ByteToCodePoint) back to raw bytes.
absl::StatusOr<std::string> TokenToBytes(std::string_view token, const absl::flat_hash_map<int, int>& cp_to_byte) {
  std::string out;
  for (size_t i = 0; i < token.size();) {
    const unsigned char c = static_cast<unsigned char>(token[i]);
    int cp, len;
    if (c < 0x80) {
      cp = c, len = 1;
    } else if ((c >> 5) == 6 && i + 1 < token.size()) {
      cp = ((c & 0x1f) << 6) | (token[i + 1] & 0x3f), len = 2;
    } else if ((c >> 4) == 14 && i + 2 < token.size()) {
      cp = ((c & 0x0f) << 12) | ((token[i + 1] & 0x3f) << 6) | (token[i + 2] & 0x3f), len = 3;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("token \"", std::string(token), "\" is not byte-level BPE text"));
    }
    auto it = cp_to_byte.find(cp);
    if (it == cp_to_byte.end()) {
      return absl::InvalidArgumentError(absl::StrCat("token \"", std::string(token), "\" has a character outside the byte-level alphabet"));
    }
    out.push_back(static_cast<char>(it->second));
    i += static_cast<size_t>(len);
  }
  return out;
}

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> id_to_bytes;
  std::vector<bool> special;
  absl::flat_hash_map<std::string, int> bytes_to_id;
  std::array<int, 256> byte_id{};
  absl::flat_hash_map<uint64_t, std::pair<int, int>> merges;  // (left, right) -> (rank, merged)
  std::vector<std::pair<std::string, int>> added;              // content -> id, longest first
  std::vector<int> prefix;
  bool add_prefix_space = false;
  size_t chunk_bytes = 1 << 20;
  pcre2_code* regex = nullptr;

  ~Impl() {
    if (regex != nullptr) pcre2_code_free(regex);
  }

  absl::Status Finish() {
    for (int b = 0; b < 256; ++b) {
      auto it = bytes_to_id.find(std::string(1, static_cast<char>(b)));
      if (it == bytes_to_id.end()) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer vocabulary lacks the byte-level token for byte ", b));
      }
      byte_id[b] = it->second;
    }
    std::sort(added.begin(), added.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    int err;
    PCRE2_SIZE offset;
    regex = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kGpt2Pattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                          &err, &offset, nullptr);
    if (regex == nullptr) return absl::InternalError("cannot compile the GPT-2 pre-tokenizer regex");
    pcre2_jit_compile(regex, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is absent
    return absl::OkStatus();
  }

  absl::Status AddMerge(const std::string& left_tok, const std::string& right_tok, int rank,
                        const absl::flat_hash_map<int, int>& cp_to_byte) {
    FERRY_ASSIGN_OR_RETURN(std::string l, TokenToBytes(left_tok, cp_to_byte));
    FERRY_ASSIGN_OR_RETURN(std::string r, TokenToBytes(right_tok, cp_to_byte));
    auto li = bytes_to_id.find(l), ri = bytes_to_id.find(r), mi = bytes_to_id.find(l + r);
    if (li == bytes_to_id.end() || ri == bytes_to_id.end() || mi == bytes_to_id.end()) {
      return absl::InvalidArgumentError(absl::StrCat("merge \"", left_tok, " ", right_tok, "\" uses a token not in the vocabulary"));
    }
    const uint64_t key = (static_cast<uint64_t>(li->second) << 32) | static_cast<uint32_t>(ri->second);
    merges.try_emplace(key, rank, mi->second);
    return absl::OkStatus();
  }

  // BPE of one pre-token: symbols in a linked list, candidate merges in a min-heap ordered by
  // (rank, position) so the lowest-ranked, leftmost pair merges first.
  void Bpe(std::string_view word, std::vector<int>* out) const {
    const int n = static_cast<int>(word.size());
    if (n == 1) {
      out->push_back(byte_id[static_cast<unsigned char>(word[0])]);
      return;
    }
    std::vector<int> ids(n), next(n), prev(n);
    for (int i = 0; i < n; ++i) {
      ids[i] = byte_id[static_cast<unsigned char>(word[i])];
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    struct Cand {
      int rank, pos, left, right, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int pos) {
      if (pos < 0 || next[pos] < 0) return;
      const uint64_t key = (static_cast<uint64_t>(ids[pos]) << 32) | static_cast<uint32_t>(ids[next[pos]]);
      auto it = merges.find(key);
      if (it != merges.end()) heap.push({it->second.first, pos, ids[pos], ids[next[pos]], it->second.second});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      const int r = next[c.pos];
      if (ids[c.pos] != c.left || r < 0 || ids[r] != c.right) continue;  // stale
      ids[c.pos] = c.merged;
      ids[r] = -1;
      next[c.pos] = next[r];
      if (next[r] >= 0) prev[next[r]] = c.pos;
      push(prev[c.pos]);
      push(c.pos);
    }
    for (int i = 0; i >= 0; i = next[i]) out->push_back(ids[i]);
  }

  // Pre-tokenizes and BPEs one segment without added tokens, with a per-call cache.
  absl::Status EncodeSegment(std::string_view text, std::vector<int>* out) const {
    std::string with_space;
    if (add_prefix_space && !text.empty() && text[0] != ' ') {
      with_space.reserve(text.size() + 1);
      with_space.push_back(' ');
      with_space.append(text.data(), text.size());
      text = with_space;
    }
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(regex, nullptr);
    if (md == nullptr) return absl::ResourceExhaustedError("pcre2: cannot allocate match data");
    absl::flat_hash_map<std::string_view, std::pair<uint32_t, uint32_t>> cache;
    std::vector<int> pool;
    PCRE2_SIZE start = 0;
    absl::Status status;
    while (start < text.size()) {
      const int rc = pcre2_match(regex, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start,
                                 start == 0 ? 0 : PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) {
        if (rc == PCRE2_ERROR_NOMATCH) break;  // cannot happen: \s+ or a class matches any char
        status = absl::InternalError(absl::StrCat("pcre2_match failed with code ", rc));
        break;
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] <= ov[0]) {  // empty match: step one byte to stay safe
        start = ov[1] + 1;
        continue;
      }
      const std::string_view word = text.substr(ov[0], ov[1] - ov[0]);
      auto it = cache.find(word);
      if (it == cache.end()) {
        const uint32_t begin = static_cast<uint32_t>(pool.size());
        Bpe(word, &pool);
        it = cache.emplace(word, std::make_pair(begin, static_cast<uint32_t>(pool.size()) - begin)).first;
      }
      out->insert(out->end(), pool.begin() + it->second.first, pool.begin() + it->second.first + it->second.second);
      start = ov[1];
    }
    pcre2_match_data_free(md);
    return status;
  }

  // Splits on added tokens; BPE-encodes the text between them (large texts in parallel chunks cut
  // where the regex cannot join across the cut: "<non-space>\n|<ASCII non-space>").
  absl::Status EncodeText(std::string_view text, std::vector<int>* out) const {
    size_t seg_begin = 0;
    auto flush = [&](size_t end) -> absl::Status {
      if (end > seg_begin) FERRY_RETURN_IF_ERROR(EncodeLarge(text.substr(seg_begin, end - seg_begin), out));
      return absl::OkStatus();
    };
    if (!added.empty()) {
      std::array<bool, 256> first{};
      for (const auto& [content, id] : added) {
        if (!content.empty()) first[static_cast<unsigned char>(content[0])] = true;
      }
      for (size_t i = 0; i < text.size();) {
        bool matched = false;
        if (first[static_cast<unsigned char>(text[i])]) {
          for (const auto& [content, id] : added) {
            if (!content.empty() && text.compare(i, content.size(), content) == 0) {
              FERRY_RETURN_IF_ERROR(flush(i));
              out->push_back(id);
              i += content.size();
              seg_begin = i;
              matched = true;
              break;
            }
          }
        }
        if (!matched) ++i;
      }
    }
    return flush(text.size());
  }

  absl::Status EncodeLarge(std::string_view text, std::vector<int>* out) const {
    const size_t kChunk = std::max<size_t>(chunk_bytes, 16);
    if (text.size() < 2 * kChunk) return EncodeSegment(text, out);
    std::vector<std::string_view> chunks;
    size_t begin = 0;
    while (begin < text.size()) {
      size_t cut = std::min(text.size(), begin + kChunk);
      while (cut < text.size()) {
        const unsigned char before = static_cast<unsigned char>(text[cut - 2]);
        const unsigned char at = static_cast<unsigned char>(text[cut]);
        const bool before_ok = before > 0x20 && before < 0x80;
        if (text[cut - 1] == '\n' && before_ok && at > 0x20 && at < 0x7f) break;
        ++cut;
      }
      chunks.push_back(text.substr(begin, cut - begin));
      begin = cut;
    }
    std::vector<std::vector<int>> parts(chunks.size());
    std::vector<absl::Status> statuses(chunks.size());
    ThreadPool::Default().ParallelFor(static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) statuses[i] = EncodeSegment(chunks[i], &parts[i]);
    });
    for (size_t i = 0; i < chunks.size(); ++i) {
      FERRY_RETURN_IF_ERROR(statuses[i]);
      out->insert(out->end(), parts[i].begin(), parts[i].end());
    }
    return absl::OkStatus();
  }
};

namespace {

// Checked readers of tokenizer.json: a field of the wrong type or an id out of range is one clear
// kInvalidArgument naming the field, never an exception or a silent truncation.
constexpr int64_t kMaxTokenId = int64_t{1} << 22;  // 4M: above every real vocabulary (Gemma's is 262144)

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

}  // namespace

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
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    return absl::InvalidArgumentError("tokenizer.json: \"normalizer\" is not supported (byte-level BPE has none)");
  }
  auto impl = std::make_unique<Impl>();
  if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
    const json& p = j["pre_tokenizer"];
    if (!p.is_object()) return Bad("pre_tokenizer", "must be an object");
    FERRY_ASSIGN_OR_RETURN(const std::string type, StringField(p, "type", "", "pre_tokenizer."));
    if (type != "ByteLevel") {
      return absl::InvalidArgumentError("tokenizer.json: \"pre_tokenizer.type\" must be \"ByteLevel\"");
    }
    FERRY_ASSIGN_OR_RETURN(impl->add_prefix_space, BoolField(p, "add_prefix_space", false, "pre_tokenizer."));
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
  std::vector<std::tuple<std::string, int, bool>> added_tokens;
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) return Bad("added_tokens", "must be a list");
    for (const auto& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a.contains("content") || !a["content"].is_string()) {
        return absl::InvalidArgumentError("tokenizer.json: each added token needs \"id\" and \"content\"");
      }
      FERRY_ASSIGN_OR_RETURN(const int id, TokenId(a["id"], "added_tokens[].id"));
      FERRY_ASSIGN_OR_RETURN(const bool special, BoolField(a, "special", false, "added_tokens[]."));
      added_tokens.emplace_back(a["content"].get<std::string>(), id, special);
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
  for (const auto& [content, id, special] : added_tokens) added_ids[content] = id;
  for (const auto& [tok, id] : entries) {
    if (added_ids.contains(tok)) continue;  // added tokens are literal text, not byte-level
    FERRY_ASSIGN_OR_RETURN(std::string bytes, TokenToBytes(tok, cp_to_byte));
    impl->bytes_to_id.emplace(bytes, id);
    impl->id_to_bytes[id] = std::move(bytes);
  }
  for (const auto& [content, id, special] : added_tokens) {
    impl->id_to_bytes[id] = content;
    impl->special[id] = special;
    impl->added.emplace_back(content, id);
  }
  int rank = 0;
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
    FERRY_RETURN_IF_ERROR(impl->AddMerge(l, r, rank++, cp_to_byte));
  }
  if (j.contains("post_processor") && !j["post_processor"].is_null()) {
    const json& pp = j["post_processor"];
    if (!pp.is_object()) return Bad("post_processor", "must be an object");
    FERRY_ASSIGN_OR_RETURN(const std::string type, StringField(pp, "type", "", "post_processor."));
    if (type == "TemplateProcessing") {
      if (!pp.contains("single") || !pp["single"].is_array()) return Bad("post_processor.single", "must be a list");
      for (const auto& piece : pp["single"]) {
        if (!piece.is_object()) return Bad("post_processor.single[]", "must be an object");
        if (!piece.contains("SpecialToken")) break;
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
          impl->prefix.push_back(v);
        }
      }
    } else if (type != "ByteLevel") {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: \"post_processor.type\" \"", type, "\" is not supported"));
    }
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

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromModelDir(const std::string& dir) {
  if (PathExists(dir + "/tokenizer.json")) {
    FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/tokenizer.json"));
    auto tok = FromTokenizerJson(text);
    if (!tok.ok()) return absl::Status(tok.status().code(), absl::StrCat(dir, "/", tok.status().message()));
    return tok;
  }
  if (!PathExists(dir + "/vocab.json") || !PathExists(dir + "/merges.txt")) {
    return absl::NotFoundError(absl::StrCat("no tokenizer.json (or vocab.json + merges.txt) in ", dir));
  }
  FERRY_ASSIGN_OR_RETURN(std::string vocab, ReadFileToString(dir + "/vocab.json"));
  FERRY_ASSIGN_OR_RETURN(std::string merges, ReadFileToString(dir + "/merges.txt"));
  // OPT's convention; special_tokens_map.json overrides it when present.
  std::vector<std::string> specials = {"<s>", "<pad>", "</s>", "<unk>"};
  std::string bos = "</s>";
  if (PathExists(dir + "/special_tokens_map.json")) {
    FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/special_tokens_map.json"));
    json sm = json::parse(text, nullptr, false);
    if (sm.is_discarded() || !sm.is_object()) return absl::InvalidArgumentError(dir + "/special_tokens_map.json: malformed JSON");
    specials.clear();
    for (auto it = sm.begin(); it != sm.end(); ++it) {
      if (it.value().is_string()) specials.push_back(it.value().get<std::string>());
      if (it.key() == "bos_token" && it.value().is_string()) bos = it.value().get<std::string>();
    }
    std::sort(specials.begin(), specials.end());
    specials.erase(std::unique(specials.begin(), specials.end()), specials.end());
  }
  return FromVocabAndMerges(vocab, merges, specials, bos);
}

absl::StatusOr<std::vector<int>> Tokenizer::EncodeNoPrefix(std::string_view text) const {
  const size_t bad = FindInvalidUtf8(text);
  if (bad != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 at byte ", bad));
  }
  std::vector<int> ids;
  FERRY_RETURN_IF_ERROR(impl_->EncodeText(text, &ids));
  return ids;
}

absl::StatusOr<std::vector<int>> Tokenizer::Encode(std::string_view text) const {
  FERRY_ASSIGN_OR_RETURN(std::vector<int> body, EncodeNoPrefix(text));
  std::vector<int> ids = impl_->prefix;
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

absl::StatusOr<std::string> Tokenizer::TokenBytes(int id) const {
  if (id < 0 || id >= vocab_size()) return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary"));
  return impl_->id_to_bytes[id];
}

absl::StatusOr<std::string> Tokenizer::Decode(const std::vector<int>& ids, const DecodeOptions& options) const {
  std::string bytes;
  for (int id : ids) {
    if (id < 0 || id >= vocab_size()) return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary"));
    if (options.skip_special_tokens && impl_->special[id]) continue;
    bytes += impl_->id_to_bytes[id];
  }
  return SanitizeUtf8(bytes);
}

void Tokenizer::set_parallel_chunk_bytes(size_t bytes) { impl_->chunk_bytes = bytes; }
int Tokenizer::vocab_size() const { return static_cast<int>(impl_->id_to_bytes.size()); }
bool Tokenizer::IsSpecial(int id) const { return id >= 0 && id < vocab_size() && impl_->special[id]; }
const std::vector<int>& Tokenizer::prefix_ids() const { return impl_->prefix; }

}  // namespace ferry::engine
