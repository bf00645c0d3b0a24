#include "engine/tokenizer.h"

#include "engine/tokenizer_impl.h"
#include "engine/tokenizer_internal.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <queue>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "engine/gguf_model.h"
#include "engine/spm_processor.h"
#include "io/gguf.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace tokenizer_internal {

// Texts split at "<ASCII non-space>\n|<ASCII non-space>" give the same pieces on both sides with
// these patterns (no match crosses such a cut), so long texts may be encoded in parallel chunks.
bool CutSafe(const std::string& pattern) {
  for (const char* p : {kGpt2Pattern, kLlama3Pattern, kQwen2Pattern, kDigitPattern, kDigitsPattern, kPunctuationPattern}) {
    if (pattern == p) return true;
  }
  return false;
}

// Applies one Split step to the pieces [begin, end) of `text`.
absl::Status SplitPieces(const PreStep& step, std::string_view text, const std::vector<std::pair<size_t, size_t>>& in,
                         std::vector<std::pair<size_t, size_t>>* out, pcre2_match_data* md) {
  out->clear();
  for (const auto& [pb, pe] : in) {
    // (begin, end, is_match) spans covering the piece
    std::vector<std::tuple<size_t, size_t, bool>> spans;
    const std::string_view piece = text.substr(pb, pe - pb);
    size_t start = 0, last = 0;
    while (start < piece.size()) {
      const int rc = pcre2_match(step.regex, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(), start,
                                 PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) return absl::InternalError(absl::StrCat("pcre2_match failed with code ", rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] <= ov[0]) {  // empty match: no piece, step one character
        start = NextCodePoint(piece, ov[0]);
        continue;
      }
      if (ov[0] > last) spans.emplace_back(last, ov[0], false);
      spans.emplace_back(ov[0], ov[1], true);
      last = start = ov[1];
    }
    if (last < piece.size()) spans.emplace_back(last, piece.size(), false);
    if (step.invert) {
      for (auto& sp : spans) std::get<2>(sp) = !std::get<2>(sp);
    }
    std::vector<std::pair<size_t, size_t>> pieces;
    bool prev_match = false;
    if (step.behavior == SplitBehavior::kMergedWithNext) {  // as tokenizers does it: from the right
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        const auto& [b, e, is_match] = *it;
        if (is_match && !prev_match && !pieces.empty()) {
          pieces.back().first = pb + b;
        } else {
          pieces.emplace_back(pb + b, pb + e);
        }
        prev_match = is_match;
      }
      std::reverse(pieces.begin(), pieces.end());
    } else {
      for (const auto& [b, e, is_match] : spans) {
        const size_t ab = pb + b, ae = pb + e;
        switch (step.behavior) {
          case SplitBehavior::kIsolated:
            pieces.emplace_back(ab, ae);
            break;
          case SplitBehavior::kRemoved:
            if (!is_match) pieces.emplace_back(ab, ae);
            break;
          case SplitBehavior::kMergedWithPrevious:
            if (is_match && !prev_match && !pieces.empty()) {
              pieces.back().second = ae;
            } else {
              pieces.emplace_back(ab, ae);
            }
            break;
          case SplitBehavior::kContiguous:
          case SplitBehavior::kMergedWithNext:
            if (is_match == prev_match && !pieces.empty()) {
              pieces.back().second = ae;
            } else {
              pieces.emplace_back(ab, ae);
            }
            break;
        }
        prev_match = is_match;
      }
    }
    out->insert(out->end(), pieces.begin(), pieces.end());
  }
  return absl::OkStatus();
}

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

}  // namespace tokenizer_internal

using nlohmann::json;
using namespace tokenizer_internal;  // NOLINT: the shared patterns and limits

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromSentencePieceModel(const std::string& path) {
  FERRY_ASSIGN_OR_RETURN(const std::string bytes, ReadFileToString(path));
  auto impl = std::make_unique<Impl>();
  std::string error;
  impl->sp = SpmProcessor::Load(bytes, &error);
  if (impl->sp == nullptr) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot read the SentencePiece model: ", error));
  const int n = impl->sp->size();
  if (n <= 0 || n >= kMaxTokenId) return absl::InvalidArgumentError(absl::StrCat(path, ": SentencePiece model has ", n, " pieces"));
  impl->id_to_bytes.resize(n);
  impl->special.assign(n, false);
  for (int id = 0; id < n; ++id) {
    impl->id_to_bytes[id] = impl->sp->Piece(id);
    impl->special[id] = impl->sp->IsControl(id);
  }
  // Llama's convention (LlamaTokenizer's add_bos_token): BOS first when the model has one.
  if (impl->sp->bos_id() >= 0) impl->prefix = {impl->sp->bos_id()};
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromModelDir(const std::string& dir) {
  if (IsGgufFile(dir)) {
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<io::GgufFile> file, io::GgufFile::Open(dir));
    return FromGguf(*file);
  }
  if (PathExists(dir + "/tokenizer.json")) {
    FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/tokenizer.json"));
    auto tok = FromTokenizerJson(text);
    if (!tok.ok()) return absl::Status(tok.status().code(), absl::StrCat(dir, "/", tok.status().message()));
    return tok;
  }
  if (PathExists(dir + "/tokenizer.model") && !PathExists(dir + "/vocab.json")) return FromSentencePieceModel(dir + "/tokenizer.model");
  if (!PathExists(dir + "/vocab.json") || !PathExists(dir + "/merges.txt")) {
    return absl::NotFoundError(absl::StrCat("no tokenizer.json (or vocab.json + merges.txt, or tokenizer.model) in ", dir));
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
  if (impl_->sp) {
    std::string error;
    if (!impl_->sp->Encode(std::string(text), &ids, &error)) return absl::InternalError(absl::StrCat("sentencepiece: ", error));
    return ids;
  }
  FERRY_RETURN_IF_ERROR(impl_->EncodeText(text, &ids));
  return ids;
}

absl::StatusOr<std::vector<int>> Tokenizer::Encode(std::string_view text) const {
  FERRY_ASSIGN_OR_RETURN(std::vector<int> body, EncodeNoPrefix(text));
  std::vector<int> ids = impl_->prefix;
  ids.insert(ids.end(), body.begin(), body.end());
  ids.insert(ids.end(), impl_->suffix.begin(), impl_->suffix.end());
  return ids;
}

absl::StatusOr<std::string> Tokenizer::TokenBytes(int id) const {
  if (id < 0 || id >= vocab_size()) return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary"));
  return impl_->id_to_bytes[id];
}

absl::StatusOr<std::string> Tokenizer::Decode(const std::vector<int>& ids, const DecodeOptions& options) const {
  if (impl_->sp) {
    std::vector<int> kept;
    for (int id : ids) {
      if (id < 0 || id >= vocab_size()) return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary"));
      if (!(options.skip_special_tokens && impl_->special[id])) kept.push_back(id);
    }
    std::string text, error;
    if (!impl_->sp->Decode(kept, &text, &error)) return absl::InternalError(absl::StrCat("sentencepiece: ", error));
    return SanitizeUtf8(text);
  }
  if (impl_->spm) {
    std::vector<std::string> toks;
    for (int id : ids) {
      if (id < 0 || id >= vocab_size()) return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary"));
      if (options.skip_special_tokens && impl_->special[id]) continue;
      toks.push_back(impl_->id_to_bytes[id]);
    }
    return SanitizeUtf8(impl_->RunDecoders(std::move(toks)));
  }
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
