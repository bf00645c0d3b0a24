// The two input/output formats of batch jobs, one request per line:
//
// ferry's own:  in  {"id": any JSON (optional; the record's index otherwise), "prompt": "..."}
//               out {"id", "prompt", "completion", "token_ids", "finish_reason"}
//                   (an unservable request, with --on-bad-request=record: {"id", "prompt", "error"})
// OpenAI Batch: in  {"custom_id": "...", "method": "POST", "url": "/v1/completions" or
//                   "/v1/chat/completions", "body": {...}} with body.prompt or body.messages and
//                   max_tokens (max_completion_tokens), temperature, top_p, top_k, seed, stop,
//                   min_tokens, n (1), model (echoed)
//               out {"id", "custom_id", "response": {"status_code", "request_id", "body": a
//                   text_completion or chat.completion object with choices, finish_reason and
//                   usage}, "error": null}; an unservable request gets status 400 and an error body.
//
// Output records are a function of the request, the settings and the input file only (ids derive
// from custom_id, `created` is the input's modification time), so a sharded, resumed or repeated
// run writes the same bytes as one uninterrupted run.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {

enum class BatchFormat { kFerry, kOpenAI };

// "ferry", "openai"; "auto" is resolved by DetectBatchFormat.
absl::StatusOr<BatchFormat> ParseBatchFormat(std::string_view name);
// From the first non-blank line: an object with "custom_id" or "body" is OpenAI's, else ferry's.
BatchFormat DetectBatchFormat(std::string_view first_line);

// What a request asks for beyond its prompt; the job's flags give the defaults.
struct RequestParams {
  int max_tokens = 32;
  int min_tokens = 0;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  std::optional<uint64_t> seed;  // the request's own seed (its random stream ignores its position)
  std::vector<std::string> stop;
};

struct BatchRequest {
  enum Kind { kPrompt, kCompletion, kChat };
  Kind kind = kPrompt;
  nlohmann::json id;      // ferry: the line's "id" (or its index); OpenAI: custom_id
  std::string key;        // the id as one string (custom_id, or ferry's id in JSON), unique per input for merging
  std::string prompt;     // kPrompt, kCompletion (text)
  std::vector<int> prompt_ids;       // kCompletion given as token ids
  nlohmann::ordered_json messages;   // kChat, content flattened to strings
  std::string model;      // body.model, echoed
  RequestParams params;
  std::string error;      // set when the request cannot be served: its message
};

// One line (already known not to be blank) of the given format into a request. `index`: the
// record's place in the input. A line that is not a request at all (not JSON, not an object, no
// custom_id) is an error; a request ferry cannot serve (an unknown url, n > 1, a parameter out of
// range, an unsupported field) comes back with `error` set, so the job can reject or record it.
absl::StatusOr<BatchRequest> ParseBatchRequest(std::string_view line, BatchFormat format, int64_t index,
                                               const RequestParams& defaults);

struct Completion {
  std::string text;            // cut before the first stop sequence
  std::vector<int> token_ids;
  std::string finish_reason;   // "eos", "stop" (a stop sequence), "length"
  int64_t prompt_tokens = 0;
};

// The output line (no newline) of a served request.
std::string CompletionRecord(BatchFormat format, const BatchRequest& request, const Completion& completion,
                             const std::string& model_name, int64_t created);
// The output line of a request that could not be served.
std::string ErrorRecord(BatchFormat format, const BatchRequest& request, const std::string& message);

// The id key of an output line (custom_id, or ferry's id as JSON); kDataLoss when the line is not a
// record of this format.
absl::StatusOr<std::string> RecordKey(std::string_view line, BatchFormat format);

// 64-bit FNV-1a, the stable hash behind derived ids and --shard-by id.
uint64_t StableHash(std::string_view s);

// Where the earliest stop sequence starts in `text`, or npos.
size_t FindStop(std::string_view text, const std::vector<std::string>& stops);

}  // namespace ferry::engine
