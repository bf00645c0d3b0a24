// What tokenizer.cc and gguf_tokenizer.cc share: the pre-tokenizer regexes of the families ferry
// knows (as their tokenizer.json files spell them), the token id limit, UTF-8 stepping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ferry::engine::tokenizer_internal {

inline constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Llama 3 (tiktoken's cl100k) and Qwen2, as their tokenizer.json files spell them.
inline constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr const char* kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr const char* kDigitPattern = R"(\p{N})";
inline constexpr const char* kDigitsPattern = R"(\p{N}+)";
inline constexpr const char* kPunctuationPattern = R"([\p{P}!-/:-@\[-`{-~])";

// Token ids index tables of max id + 1 entries: 4M is above every real vocabulary (Gemma's is 262144).
inline constexpr int64_t kMaxTokenId = int64_t{1} << 22;

// The byte after the UTF-8 character that starts at i.
inline size_t NextCodePoint(std::string_view s, size_t i) {
  ++i;
  while (i < s.size() && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) ++i;
  return i;
}

}  // namespace ferry::engine::tokenizer_internal
