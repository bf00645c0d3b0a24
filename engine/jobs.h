// Batch generation jobs over JSONL files of requests (ferry's format or OpenAI's Batch format,
// engine/batch_format.h), one output record per request, in input order.
//
// Validation first: every line is parsed before any generation (a line that is not a request, or
// an OpenAI custom_id seen twice, fails the job with its line number); this shard's requests are
// also rendered (chat templates), tokenized and checked against the context. A request ferry
// cannot serve fails the job with its line number too, or with `record_bad_requests` becomes an
// error record in its place while the rest run.
//
// Shards: with shard {I, N} a job serves only the records whose index (or, `by_id`, whose id's
// StableHash) is I mod N, and writes them to OUTPUT.shard-IIIII-of-NNNNN; every record is in
// exactly one shard, the same one on every run. MergeShards joins the shard outputs in input order.
//
// Throughput: requests are read in windows of `window_batches` batches, grouped by their sampling
// settings and sorted by prompt length inside the window, so a batch holds prompts of similar
// length; results are written in input order as soon as a window's next records are done.
//
// Nothing is lost: an existing non-empty output file is refused unless the job resumes it or is
// told to overwrite it. Resuming checks that the output's complete lines are the first records of
// this shard (ids in order), drops a torn last line (a job killed mid-write), and generates the
// rest, appending; sampled requests keep their random streams (by input index, or the request's
// own seed), so a resumed or sharded job writes what an uninterrupted single job would have. The
// output is locked (two jobs on one file are refused), must not be the input, and every write is
// of whole records or cut back (a full disk stops the job with an error and leaves a file --resume
// continues).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"
#include "engine/batch_format.h"
#include "engine/chat_template.h"
#include "engine/generator.h"
#include "engine/tokenizer.h"

namespace ferry::engine {

struct Shard {
  int64_t index = 0;
  int64_t count = 1;
  bool by_id = false;  // partition by StableHash(id) instead of the record index
};

// "I/N" (0 <= I < N); "auto": from SLURM_ARRAY_TASK_ID (less SLURM_ARRAY_TASK_MIN, over
// SLURM_ARRAY_TASK_STEP) of SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX of FERRY_SHARD_COUNT
// (a Kubernetes Indexed Job), else 0/1.
absl::StatusOr<Shard> ParseShard(const std::string& spec);
bool InShard(const Shard& shard, int64_t index, const std::string& key);
// OUTPUT.shard-00002-of-00004 (just OUTPUT when there is one shard).
std::string ShardOutputPath(const std::string& output, const Shard& shard);

struct GenerateJobOptions {
  std::string input_path;
  std::string output_path;  // empty or "-": stdout
  std::optional<BatchFormat> format;  // nullopt: detected from the first line
  int batch_size = 16;
  int window_batches = 8;   // batches per length-bucketing window
  GenerateOptions generate;  // defaults of each request's max tokens and sampling
  std::vector<std::string> stop;  // default stop sequences
  Shard shard;
  bool record_bad_requests = false;
  std::optional<ChatFormat> chat;  // the model's chat template (chat requests need one)
  std::string model_name;          // "model" of OpenAI responses without body.model
  bool show_progress = true;  // progress lines on stderr
  bool resume = false;         // continue an existing output file
  bool overwrite = false;      // replace an existing output file
  // What decides the records besides the input (model, sampling, lengths, cache): written beside
  // the output (OUTPUT.job.json) and compared on --resume, so a resumed job never mixes records of
  // different settings.
  nlohmann::json parameters = nlohmann::json::object();
};

// kAlreadyExists when `path` is a non-empty file (output that would be lost), naming --resume and
// --overwrite.
absl::Status RefuseExistingOutput(const std::string& path);

absl::Status RunGenerateJob(Model& model, const Tokenizer& tokenizer, const GenerateJobOptions& options);

struct MergeOptions {
  std::string input_path;
  std::optional<BatchFormat> format;
  std::vector<std::string> shard_paths;
  std::string output_path;
  bool overwrite = false;
  bool show_progress = true;
};

// Joins shard outputs into one file in input order (written to OUTPUT.tmp and renamed: a failed
// merge leaves no output). Refuses, naming up to 10 ids of each, when a record of the input is in no
// shard, in two, or a shard holds a record the input lacks; also a torn shard (killed mid-write)
// and an input whose ids repeat.
absl::Status MergeShards(const MergeOptions& options);

}  // namespace ferry::engine
