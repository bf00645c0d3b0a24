// GGUF: any bytes as a model file. A header that validates must allow reading and dequantizing
// every tensor it lists without going out of bounds; the metadata must map to a config and a
// tokenizer, or be refused, without crashing; a tokenizer that loads must encode and decode.
#include <cstdint>
#include <vector>

#include "engine/gguf_model.h"
#include "engine/tokenizer.h"
#include "fuzz_util.h"
#include "io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = ferry::fuzz::ScratchDir() + "/model.gguf";
  ferry::fuzz::Write(path, data, size);
  auto file = ferry::io::GgufFile::Open(path);
  if (!file.ok()) return 0;
  for (const auto& t : (*file)->tensors()) {
    if (t.rows() * t.row_elements() > (4 << 20)) continue;
    std::vector<float> out(static_cast<size_t>(t.rows() * t.row_elements()));
    (void)(*file)->ReadRowsF32(t, 0, t.rows(), out.data());
  }
  (void)ferry::engine::ConfigJsonFromGguf(**file);
  auto tok = ferry::engine::Tokenizer::FromGguf(**file);
  if (tok.ok()) {
    for (const std::string& s : {std::string("Hello world 123"), std::string("  \n\t x")}) {
      auto ids = (*tok)->Encode(s);
      if (ids.ok()) (void)(*tok)->Decode(*ids);
    }
  }
  (void)ferry::engine::OpenGgufModel(path);
  return 0;
}
