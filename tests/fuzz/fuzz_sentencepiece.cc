// tokenizer.model (SentencePiece, read by libsentencepiece): any bytes as the model file; a model
// that loads must encode and decode a few strings (the first 64 input bytes among them).
#include <algorithm>
#include <cstdint>
#include <string>

#include "engine/tokenizer.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = ferry::fuzz::ScratchDir() + "/tokenizer.model";
  ferry::fuzz::Write(path, data, size);
  auto tok = ferry::engine::Tokenizer::FromSentencePieceModel(path);
  if (!tok.ok()) return 0;
  const std::string text(reinterpret_cast<const char*>(data), std::min<size_t>(size, 64));
  for (const std::string& s : {std::string("Hello world 123"), std::string("  \n\t x"), text}) {
    auto ids = (*tok)->Encode(s);
    if (ids.ok()) (void)(*tok)->Decode(*ids);
  }
  return 0;
}
