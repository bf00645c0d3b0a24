#include "engine/tokenizer.h"

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
namespace {

using nlohmann::json;
using namespace tokenizer_internal;  // NOLINT: the shared patterns and limits

// Texts split at "<ASCII non-space>\n|<ASCII non-space>" give the same pieces on both sides with
// these patterns (no match crosses such a cut), so long texts may be encoded in parallel chunks.
bool CutSafe(const std::string& pattern) {
  for (const char* p : {kGpt2Pattern, kLlama3Pattern, kQwen2Pattern, kDigitPattern, kDigitsPattern, kPunctuationPattern}) {
    if (pattern == p) return true;
  }
  return false;
}

// How a Split pre-tokenizer treats its matches (tokenizers' SplitDelimiterBehavior).
enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreStep {
  std::string pattern;
  pcre2_code* regex = nullptr;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

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

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> id_to_bytes;
  std::vector<bool> special;
  absl::flat_hash_map<std::string, int> bytes_to_id;
  std::array<int, 256> byte_id{};
  absl::flat_hash_map<uint64_t, std::pair<int, int>> merges;  // (left, right) -> (rank, merged)
  struct Added {
    std::string content;
    int id;
    bool lstrip, rstrip;  // the token takes the whitespace on its left / right with it
  };
  std::vector<Added> added;  // longest first
  std::vector<int> prefix;
  std::vector<int> suffix;  // special tokens the post-processor appends (EOS, RoBERTa's </s>)
  bool add_prefix_space = false;
  bool ignore_merges = false;  // a pre-token that is itself in the vocabulary is that token
  bool cut_safe = true;        // long texts may be encoded in parallel chunks
  size_t chunk_bytes = 1 << 20;
  std::vector<PreStep> steps;  // the pre-tokenizer: Split steps in order

  // SentencePiece-style BPE (Llama 2, Mistral, TinyLlama, Gemma): the vocabulary holds text, not the
  // byte-level alphabet; characters without a token become <0xXX> byte tokens (byte_fallback) or unk.
  bool spm = false;
  bool byte_fallback = false, fuse_unk = false;
  int unk_id = -1;
  std::array<int, 256> fallback_id{};
  struct Normalizer {
    enum Kind { kPrepend, kReplace, kStrip, kUnicode, kLowercase } kind;
    std::string a, b;  // Prepend: a; Replace: pattern a -> b
    bool left = false, right = false;
    int utf8proc_options = 0;  // kUnicode: NFC, NFKC, NFD or NFKD
  };
  std::vector<Normalizer> normalizers;
  // Metaspace pre-tokenizer (the first step when present): spaces become `meta`, which is
  // prepended per the scheme (0 always, 1 first segment only, 2 never).
  bool metaspace = false;
  std::string meta = "\xe2\x96\x81";
  int meta_scheme = 0;
  struct Decoder {
    enum Kind { kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
    std::string a, b;
    int start = 0, stop = 0;
  };
  std::vector<Decoder> decoders;
  // A SentencePiece model (tokenizer.model without tokenizer.json), run by libsentencepiece.
  std::unique_ptr<SpmProcessor> sp;

  ~Impl() {
    for (PreStep& s : steps) {
      if (s.regex != nullptr) pcre2_code_free(s.regex);
    }
  }

  absl::Status AddStep(const std::string& pattern, SplitBehavior behavior, bool invert) {
    PreStep step;
    step.pattern = pattern;
    step.behavior = behavior;
    step.invert = invert;
    int err;
    PCRE2_SIZE offset;
    step.regex = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err, &offset,
                               nullptr);
    if (step.regex == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: pre-tokenizer regex \"", pattern, "\" does not compile at offset ",
                                                     offset, ": ", reinterpret_cast<const char*>(msg)));
    }
    pcre2_jit_compile(step.regex, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is absent
    cut_safe = cut_safe && CutSafe(pattern) && (behavior == SplitBehavior::kIsolated) && !invert;
    steps.push_back(std::move(step));
    return absl::OkStatus();
  }

  absl::Status Finish() {
    if (spm) {
      cut_safe = false;
      for (int b = 0; b < 256; ++b) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", b);
        auto it = bytes_to_id.find(std::string(name));
        fallback_id[b] = it == bytes_to_id.end() ? -1 : it->second;
      }
      std::stable_sort(added.begin(), added.end(), [](const auto& a, const auto& b) { return a.content.size() > b.content.size(); });
      return absl::OkStatus();
    }
    // A vocabulary may lack the tokens of bytes that valid UTF-8 never holds (0xC0, 0xC1, 0xF5-0xFF)
    // and, in a few vocabularies (Falcon's), of some control characters: text holding such a byte
    // is refused when it is encoded.
    int missing = 0;
    for (int b = 0; b < 256; ++b) {
      auto it = bytes_to_id.find(std::string(1, static_cast<char>(b)));
      byte_id[b] = it == bytes_to_id.end() ? -1 : it->second;
      missing += byte_id[b] < 0;
    }
    if (missing > 64) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer vocabulary lacks the byte-level tokens of ", missing, " bytes"));
    }
    std::stable_sort(added.begin(), added.end(), [](const auto& a, const auto& b) { return a.content.size() > b.content.size(); });
    return absl::OkStatus();
  }

  absl::Status AddMerge(const std::string& left_tok, const std::string& right_tok, int rank,
                        const absl::flat_hash_map<int, int>& cp_to_byte) {
    std::string l = left_tok, r = right_tok;
    if (!spm) {
      FERRY_ASSIGN_OR_RETURN(l, TokenToBytes(left_tok, cp_to_byte));
      FERRY_ASSIGN_OR_RETURN(r, TokenToBytes(right_tok, cp_to_byte));
    }
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
  // SentencePiece-style initial symbols: one per character (its token), else its byte tokens, else unk.
  absl::Status SpmSymbols(std::string_view word, std::vector<int>* ids) const {
    bool prev_unk = false;
    for (size_t i = 0; i < word.size();) {
      const size_t j = NextCodePoint(word, i);
      auto it = bytes_to_id.find(absl::string_view(word.data() + i, j - i));
      if (it != bytes_to_id.end()) {
        ids->push_back(it->second);
        prev_unk = false;
      } else {
        bool all = byte_fallback;
        for (size_t k = i; all && k < j; ++k) all = fallback_id[static_cast<unsigned char>(word[k])] >= 0;
        if (all) {
          for (size_t k = i; k < j; ++k) ids->push_back(fallback_id[static_cast<unsigned char>(word[k])]);
          prev_unk = false;
        } else if (unk_id >= 0) {
          if (!(fuse_unk && prev_unk)) ids->push_back(unk_id);
          prev_unk = true;
        } else {
          return absl::InvalidArgumentError(absl::StrCat("the text holds \"", std::string(word.substr(i, j - i)),
                                                         "\", which this vocabulary has no token for (and no unk token)"));
        }
      }
      i = j;
    }
    return absl::OkStatus();
  }

  absl::Status Bpe(std::string_view word, std::vector<int>* out) const {
    if (spm) {
      std::vector<int> ids;
      FERRY_RETURN_IF_ERROR(SpmSymbols(word, &ids));
      MergeIds(std::move(ids), out);
      return absl::OkStatus();
    }
    const int n = static_cast<int>(word.size());
    for (char c : word) {
      if (byte_id[static_cast<unsigned char>(c)] < 0) return absl::InvalidArgumentError(absl::StrCat(
          "the text holds byte 0x", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2), ", which this vocabulary has no token for"));
    }
    if (n == 1) {
      out->push_back(byte_id[static_cast<unsigned char>(word[0])]);
      return absl::OkStatus();
    }
    std::vector<int> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = byte_id[static_cast<unsigned char>(word[i])];
    MergeIds(std::move(ids), out);
    return absl::OkStatus();
  }

  // Merges symbol ids by rank: a linked list, candidate merges in a min-heap ordered by
  // (rank, position) so the lowest-ranked, leftmost pair merges first.
  void MergeIds(std::vector<int> ids, std::vector<int>* out) const {
    const int n = static_cast<int>(ids.size());
    if (n == 0) return;
    std::vector<int> next(n), prev(n);
    for (int i = 0; i < n; ++i) {
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
  absl::Status EncodeSegment(std::string_view text, std::vector<int>* out, bool first = true) const {
    std::string normalized;
    if (!normalizers.empty() || metaspace) {
      normalized = Normalize(text, first);
      text = normalized;
    }
    std::string with_space;
    if (add_prefix_space && !text.empty() && text[0] != ' ') {
      with_space.reserve(text.size() + 1);
      with_space.push_back(' ');
      with_space.append(text.data(), text.size());
      text = with_space;
    }
    std::vector<std::pair<size_t, size_t>> pieces = {{0, text.size()}}, next;
    if (text.empty()) return absl::OkStatus();
    if (!steps.empty()) {
      pcre2_match_data* md = pcre2_match_data_create(8, nullptr);
      if (md == nullptr) return absl::ResourceExhaustedError("pcre2: cannot allocate match data");
      absl::Status status;
      for (const PreStep& step : steps) {
        status = SplitPieces(step, text, pieces, &next, md);
        if (!status.ok()) break;
        pieces.swap(next);
      }
      pcre2_match_data_free(md);
      FERRY_RETURN_IF_ERROR(status);
    }
    absl::flat_hash_map<std::string_view, std::pair<uint32_t, uint32_t>> cache;
    std::vector<int> pool;
    for (const auto& [b, e] : pieces) {
      if (e <= b) continue;
      const std::string_view word = text.substr(b, e - b);
      auto it = cache.find(word);
      if (it == cache.end()) {
        const uint32_t begin = static_cast<uint32_t>(pool.size());
        auto whole = ignore_merges ? bytes_to_id.find(absl::string_view(word.data(), word.size())) : bytes_to_id.end();
        if (whole != bytes_to_id.end()) {
          pool.push_back(whole->second);
        } else {
          FERRY_RETURN_IF_ERROR(Bpe(word, &pool));
        }
        it = cache.emplace(word, std::make_pair(begin, static_cast<uint32_t>(pool.size()) - begin)).first;
      }
      out->insert(out->end(), pool.begin() + it->second.first, pool.begin() + it->second.first + it->second.second);
    }
    return absl::OkStatus();
  }

  // tokenizers' decoders over the tokens' strings, joined.
  std::string RunDecoders(std::vector<std::string> toks) const {
    for (const Decoder& d : decoders) {
      switch (d.kind) {
        case Decoder::kReplace:
          for (std::string& t : toks) t = absl::StrReplaceAll(t, {{d.a, d.b}});
          break;
        case Decoder::kByteFallback: {
          std::vector<std::string> out;
          std::string pending;
          int pending_n = 0;
          auto flush = [&] {
            if (pending_n == 0) return;
            if (FindInvalidUtf8(pending) == std::string::npos) {
              out.push_back(pending);
            } else {
              std::string r;
              for (int i = 0; i < pending_n; ++i) r += "\xef\xbf\xbd";
              out.push_back(r);
            }
            pending.clear();
            pending_n = 0;
          };
          for (const std::string& t : toks) {
            unsigned v;
            if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::isxdigit(static_cast<unsigned char>(t[3])) &&
                std::isxdigit(static_cast<unsigned char>(t[4])) && std::sscanf(t.c_str() + 3, "%2x", &v) == 1) {
              pending.push_back(static_cast<char>(v));
              ++pending_n;
            } else {
              flush();
              out.push_back(t);
            }
          }
          flush();
          toks.swap(out);
          break;
        }
        case Decoder::kFuse: {
          std::string all;
          for (const std::string& t : toks) all += t;
          toks = {all};
          break;
        }
        case Decoder::kStrip:
          for (std::string& t : toks) {
            size_t b = 0, e = t.size();
            for (int i = 0; i < d.start && b < e && absl::StartsWith(absl::string_view(t).substr(b), d.a); ++i) b += d.a.size();
            for (int i = 0; i < d.stop && e > b && absl::EndsWith(absl::string_view(t).substr(0, e), d.a); ++i) e -= d.a.size();
            t = t.substr(b, e - b);
          }
          break;
        case Decoder::kMetaspace:
          for (size_t i = 0; i < toks.size(); ++i) {
            toks[i] = absl::StrReplaceAll(toks[i], {{d.a, " "}});
            if (i == 0 && d.start && absl::StartsWith(toks[i], " ")) toks[i] = toks[i].substr(1);
          }
          break;
      }
    }
    std::string all;
    for (const std::string& t : toks) all += t;
    return all;
  }

  // The normalizers, then the Metaspace pre-tokenizer's replacement and prefix.
  std::string Normalize(std::string_view text, bool first) const {
    std::string s(text);
    for (const Normalizer& n : normalizers) {
      switch (n.kind) {
        case Normalizer::kPrepend:
          if (!s.empty()) s = n.a + s;
          break;
        case Normalizer::kReplace:
          s = absl::StrReplaceAll(s, {{n.a, n.b}});
          break;
        case Normalizer::kUnicode: {
          utf8proc_uint8_t* out = nullptr;
          const utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
                                                    &out, static_cast<utf8proc_option_t>(n.utf8proc_options));
          if (len >= 0 && out != nullptr) s.assign(reinterpret_cast<const char*>(out), static_cast<size_t>(len));
          std::free(out);  // the text is valid UTF-8 (checked on entry), so the map cannot fail
          break;
        }
        case Normalizer::kLowercase: {
          std::string r;
          r.reserve(s.size());
          for (utf8proc_ssize_t i = 0; i < static_cast<utf8proc_ssize_t>(s.size());) {
            utf8proc_int32_t cp;
            const utf8proc_ssize_t k = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data()) + i,
                                                        static_cast<utf8proc_ssize_t>(s.size()) - i, &cp);
            if (k <= 0) break;
            i += k;
            if (cp == 0x130) {  // Rust's to_lowercase: U+0130 becomes "i" + U+0307 (its one full mapping)
              r += "i\xcc\x87";
              continue;
            }
            utf8proc_uint8_t buf[4];
            const utf8proc_ssize_t w = utf8proc_encode_char(utf8proc_tolower(cp), buf);
            r.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(w));
          }
          s.swap(r);
          break;
        }
        case Normalizer::kStrip: {
          auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
          size_t b = 0, e = s.size();
          if (n.left) while (b < e && space(s[b])) ++b;
          if (n.right) while (e > b && space(s[e - 1])) --e;
          s = s.substr(b, e - b);
          break;
        }
      }
    }
    if (metaspace) {
      s = absl::StrReplaceAll(s, {{" ", meta}});
      if ((meta_scheme == 0 || (meta_scheme == 1 && first)) && !absl::StartsWith(s, meta)) s = meta + s;
    }
    return s;
  }

  // Splits on added tokens; BPE-encodes the text between them (large texts in parallel chunks cut
  // where the regex cannot join across the cut: "<non-space>\n|<ASCII non-space>").
  absl::Status EncodeText(std::string_view text, std::vector<int>* out) const {
    size_t seg_begin = 0;
    auto flush = [&](size_t end) -> absl::Status {
      if (end > seg_begin) FERRY_RETURN_IF_ERROR(EncodeLarge(text.substr(seg_begin, end - seg_begin), out, seg_begin == 0));
      return absl::OkStatus();
    };
    if (!added.empty()) {
      std::array<bool, 256> first{};
      for (const Added& a : added) {
        if (!a.content.empty()) first[static_cast<unsigned char>(a.content[0])] = true;
      }
      auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
      for (size_t i = 0; i < text.size();) {
        bool matched = false;
        if (first[static_cast<unsigned char>(text[i])]) {
          for (const Added& a : added) {
            if (!a.content.empty() && text.compare(i, a.content.size(), a.content) == 0) {
              size_t begin = i, end = i + a.content.size();
              if (a.lstrip) {
                while (begin > seg_begin && space(text[begin - 1])) --begin;
              }
              if (a.rstrip) {
                while (end < text.size() && space(text[end])) ++end;
              }
              FERRY_RETURN_IF_ERROR(flush(begin));
              out->push_back(a.id);
              i = end;
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

  absl::Status EncodeLarge(std::string_view text, std::vector<int>* out, bool first) const {
    const size_t kChunk = std::max<size_t>(chunk_bytes, 16);
    if (text.size() < 2 * kChunk || !cut_safe) return EncodeSegment(text, out, first);
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
    if (!n.contains("pattern") || !n["pattern"].is_object() || !n["pattern"].contains("String") || !n["pattern"]["String"].is_string()) {
      return Bad(where + ".pattern", "must be {\"String\": ...} (regex patterns are not supported)");
    }
    FERRY_ASSIGN_OR_RETURN(const std::string content, StringField(n, "content", "", where + "."));
    const std::string pattern = n["pattern"]["String"].get<std::string>();
    if (pattern.empty()) return Bad(where + ".pattern", "must not be empty");
    impl->normalizers.push_back({N::kReplace, pattern, content});
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
    if (!d.contains("pattern") || !d["pattern"].is_object() || !d["pattern"].contains("String") || !d["pattern"]["String"].is_string()) {
      return Bad(where + ".pattern", "must be {\"String\": ...}");
    }
    FERRY_ASSIGN_OR_RETURN(const std::string content, StringField(d, "content", "", where + "."));
    const std::string pattern = d["pattern"]["String"].get<std::string>();
    if (pattern.empty()) return Bad(where + ".pattern", "must not be empty");
    impl->decoders.push_back({D::kReplace, pattern, content});
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
