// libsentencepiece behind a plain interface: its header defines its own absl::string_view, which
// clashes with Abseil's, so it is included in engine/spm_processor.cc only.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace ferry::engine {

class SpmProcessor {
 public:
  ~SpmProcessor();
  // false with *error set when `model` is not a SentencePiece model (or ferry lacks the library).
  static std::unique_ptr<SpmProcessor> Load(const std::string& model, std::string* error);
  bool Encode(const std::string& text, std::vector<int>* ids, std::string* error) const;
  bool Decode(const std::vector<int>& ids, std::string* text, std::string* error) const;
  int size() const;
  std::string Piece(int id) const;
  bool IsControl(int id) const;
  int bos_id() const;

 private:
  SpmProcessor() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::engine
