// One JSONL job line.
#include <cstdint>
#include <string>

#include "engine/jobs.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string line(reinterpret_cast<const char*>(data), size);
  auto l = ferry::engine::ParseJobLine(line);
  if (l.ok()) (void)l->id.dump();
  return 0;
}
