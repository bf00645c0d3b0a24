// Batch generation jobs over JSONL: every line {"id": ..., "prompt": "..."} in, one line
// {"id", "prompt", "completion", "token_ids", "finish_reason"} out, in input order. The whole
// input is validated (JSON, prompt field, UTF-8, context length) before any generation starts,
// so a bad line fails fast with its line number; results are flushed batch by batch.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "engine/generator.h"
#include "engine/tokenizer.h"

namespace ferry::engine {

struct GenerateJobOptions {
  std::string input_path;
  std::string output_path;  // empty or "-": stdout
  int batch_size = 16;
  GenerateOptions generate;
  bool show_progress = true;  // progress lines on stderr
};

absl::Status RunGenerateJob(const OptModel& model, const Tokenizer& tokenizer, const GenerateJobOptions& options);

}  // namespace ferry::engine
