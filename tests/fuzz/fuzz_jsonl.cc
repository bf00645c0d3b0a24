// One line of a batch job, in both formats (ferry's JSONL and OpenAI's Batch format), and the
// output-record readers on the same bytes.
#include <cstdint>
#include <string>

#include "engine/batch_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string line(reinterpret_cast<const char*>(data), size);
  using ferry::engine::BatchFormat;
  (void)ferry::engine::DetectBatchFormat(line);
  for (BatchFormat f : {BatchFormat::kFerry, BatchFormat::kOpenAI}) {
    auto r = ferry::engine::ParseBatchRequest(line, f, 7, {});
    if (r.ok()) {
      ferry::engine::Completion c{"text", {1, 2}, "length", 3};
      (void)ferry::engine::CompletionRecord(f, *r, c, "m", 0);
      (void)ferry::engine::ErrorRecord(f, *r, "bad");
      (void)ferry::engine::FindStop(r->prompt, r->params.stop);
    }
    (void)ferry::engine::RecordKey(line, f);
  }
  return 0;
}
