// Byte-level BPE tokenizer (GPT-2 / OPT), loaded from tokenizer.json, or vocab.json + merges.txt.
// Encode: split out added/special tokens, pre-tokenize with the GPT-2 regex (PCRE2, Unicode
// classes, JIT), map bytes to the byte-level alphabet, merge pairs by rank (results cached per
// pre-token), prepend the post-processor's prefix (OPT: </s> = 2). Decode maps ids back to bytes;
// invalid UTF-8 (a completion cut inside a character) becomes U+FFFD.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::io {
class GgufFile;
}

namespace ferry::engine {

struct DecodeOptions {
  bool skip_special_tokens = true;
};

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json, or DIR/vocab.json + DIR/merges.txt when there is no tokenizer.json;
  // DIR may also be a GGUF file (FromGguf).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromModelDir(const std::string& dir);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromTokenizerJson(const std::string& json_text);
  // vocab.json text, merges.txt text, and the special tokens (added to the vocabulary) with the
  // BOS token prepended to every encoding (empty: none).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromVocabAndMerges(const std::string& vocab_json,
                                                                        const std::string& merges_txt,
                                                                        const std::vector<std::string>& special_tokens,
                                                                        const std::string& bos_token);
  // A SentencePiece model file (tokenizer.model), run by libsentencepiece; BOS first.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromSentencePieceModel(const std::string& path);
  // The tokenizer of a GGUF file's metadata (tokenizer.ggml.*), through TokenizerJsonFromGguf.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const io::GgufFile& file);
  ~Tokenizer();

  // Text must be valid UTF-8 (kInvalidArgument with the byte offset otherwise).
  absl::StatusOr<std::vector<int>> Encode(std::string_view text) const;
  // Encode without the post-processor's prefix (BOS) and suffix (EOS) tokens.
  absl::StatusOr<std::vector<int>> EncodeNoPrefix(std::string_view text) const;
  // Ids outside the vocabulary are kInvalidArgument.
  absl::StatusOr<std::string> Decode(const std::vector<int>& ids, const DecodeOptions& options = {}) const;
  // The raw bytes of one token (may be part of a UTF-8 character).
  absl::StatusOr<std::string> TokenBytes(int id) const;

  // Texts of at least 2x this many bytes are encoded in parallel chunks (default 1 MiB); the
  // ids are the same either way.
  void set_parallel_chunk_bytes(size_t bytes);

  int vocab_size() const;
  bool IsSpecial(int id) const;
  const std::vector<int>& prefix_ids() const;

 struct Impl;  // opaque

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A tokenizer.json equivalent to a GGUF file's tokenizer metadata: its vocabulary, merges, control
// and user-defined tokens (added tokens), llama.cpp's pre-tokenizer regexes for tokenizer.ggml.pre,
// BOS when add_bos_token. Refuses tokenizer models and pre-tokenizers ferry does not implement.
absl::StatusOr<std::string> TokenizerJsonFromGguf(const io::GgufFile& file);

// Replaces invalid UTF-8 sequences with U+FFFD (one per maximal invalid subpart).
std::string SanitizeUtf8(std::string_view bytes);
// Byte offset of the first invalid UTF-8 sequence, or npos when valid.
size_t FindInvalidUtf8(std::string_view bytes);

}  // namespace ferry::engine
