// safetensors: any bytes as a checkpoint file; a header that validates must allow reading every
// tensor it lists without going out of bounds.
#include <cstdint>
#include <vector>

#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = ferry::fuzz::ScratchDir() + "/model.safetensors";
  ferry::fuzz::Write(path, data, size);
  auto file = ferry::io::SafetensorsFile::Open(path);
  if (!file.ok()) return 0;
  for (const auto& [name, info] : (*file)->tensors()) {
    if (info.bytes > (64u << 20)) continue;
    std::vector<char> buf(info.bytes);
    (void)(*file)->Read(info, buf.data(), buf.size());
  }
  return 0;
}
