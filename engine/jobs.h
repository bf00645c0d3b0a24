// Batch generation jobs over JSONL: every line {"id": ..., "prompt": "..."} in, one line
// {"id", "prompt", "completion", "token_ids", "finish_reason"} out, in input order. The whole
// input is validated (JSON, prompt field, UTF-8, context length) before any generation starts,
// so a bad line fails fast with its line number; results are flushed batch by batch.
//
// Nothing is lost: an existing non-empty output file is refused unless the job resumes it or is
// told to overwrite it. Resuming checks that the output's complete lines are the first prompts of
// the input (ids in order), drops a torn last line (a job killed mid-write), and generates the
// rest, appending; sampled prompts keep their random streams (by input index), so a resumed job
// writes what an uninterrupted one would have. The output is locked (two jobs on one file are
// refused), must not be the input, and every batch is written whole or cut back (a full disk stops
// the job with an error and leaves a file --resume continues).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"
#include "engine/generator.h"
#include "engine/tokenizer.h"

namespace ferry::engine {

struct GenerateJobOptions {
  std::string input_path;
  std::string output_path;  // empty or "-": stdout
  int batch_size = 16;
  GenerateOptions generate;
  bool show_progress = true;  // progress lines on stderr
  bool resume = false;         // continue an existing output file
  bool overwrite = false;      // replace an existing output file
  // What decides the records besides the input (model, sampling, lengths, cache): written beside
  // the output (OUTPUT.job.json) and compared on --resume, so a resumed job never mixes records of
  // different settings.
  nlohmann::json parameters = nlohmann::json::object();
};

// One input line of a job: {"id": any JSON (optional), "prompt": string}. kInvalidArgument (the
// line's number is the caller's to add) for anything else, nesting deeper than 64 levels included.
struct JobLine {
  nlohmann::json id;
  bool has_id = false;  // a line without an id gets its index
  std::string prompt;
};
absl::StatusOr<JobLine> ParseJobLine(std::string_view line);

// kAlreadyExists when `path` is a non-empty file (output that would be lost), naming --resume and
// --overwrite.
absl::Status RefuseExistingOutput(const std::string& path);

absl::Status RunGenerateJob(Model& model, const Tokenizer& tokenizer, const GenerateJobOptions& options);

}  // namespace ferry::engine
