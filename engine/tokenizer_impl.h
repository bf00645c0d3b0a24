// Tokenizer::Impl, shared by tokenizer.cc (encoding and decoding, the other loaders) and
// tokenizer_json.cc (the tokenizer.json loader that fills it). Internal to the tokenizer.
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "engine/spm_processor.h"
#include "engine/tokenizer.h"
#include "engine/tokenizer_internal.h"

namespace ferry::engine::tokenizer_internal {

// How a Split pre-tokenizer treats its matches (tokenizers' SplitDelimiterBehavior).
enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreStep {
  std::string pattern;
  pcre2_code* regex = nullptr;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

// Texts split at "<ASCII non-space>\n|<ASCII non-space>" give the same pieces on both sides with
// these patterns (no match crosses such a cut), so long texts may be encoded in parallel chunks.
bool CutSafe(const std::string& pattern);
// Applies one Split step to the pieces [begin, end) of `text`.
absl::Status SplitPieces(const PreStep& step, std::string_view text, const std::vector<std::pair<size_t, size_t>>& in,
                         std::vector<std::pair<size_t, size_t>>* out, pcre2_match_data* md);
// GPT-2's byte -> unicode code point map (printable bytes map to themselves).
std::array<int, 256> ByteToCodePoint();
// Maps a byte-level token string (code points from ByteToCodePoint) back to raw bytes.
absl::StatusOr<std::string> TokenToBytes(std::string_view token, const absl::flat_hash_map<int, int>& cp_to_byte);

}  // namespace ferry::engine::tokenizer_internal

namespace ferry::engine {

// The Impl is written against the shared patterns, limits and helpers (an internal header: only
// tokenizer.cc and tokenizer_json.cc include it).
using namespace tokenizer_internal;  // NOLINT

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

}  // namespace ferry::engine
