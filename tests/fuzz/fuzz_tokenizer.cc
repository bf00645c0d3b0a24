// tokenizer.json: load it, then encode and decode a few strings (the first 64 input bytes among
// them) with whatever loaded.
#include <cstdint>
#include <string>

#include "engine/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto tok = ferry::engine::Tokenizer::FromTokenizerJson(text);
  if (!tok.ok()) return 0;
  for (const std::string& s : {std::string("Hello world"), std::string("  \n\t x"), text.substr(0, 64)}) {
    auto ids = (*tok)->Encode(s);
    if (ids.ok()) (void)(*tok)->Decode(*ids);
  }
  return 0;
}
