#include "engine/jobs.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <tuple>
#include <unordered_set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using nlohmann::json;

bool Blank(const std::string& line) { return line.find_first_not_of(" \t") == std::string::npos; }

// The format of a file: as given, or detected from its first non-blank line.
absl::StatusOr<BatchFormat> FileFormat(const std::string& path, std::optional<BatchFormat> given) {
  if (given) return *given;
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat("cannot open ", path));
  for (std::string line; std::getline(in, line);) {
    if (!Blank(line)) return DetectBatchFormat(line);
  }
  return BatchFormat::kFerry;
}

int64_t ModificationTime(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_mtime) : 0;
}

// One request of this shard, ready to generate (or to record as an error).
struct Item {
  BatchRequest req;
  int64_t index = 0;  // the record's place in the input
  std::vector<int> ids;
};

// Reads the input's requests one line at a time (blank lines are skipped); every line is parsed,
// the requests of this shard are also rendered, tokenized and checked.
class RequestReader {
 public:
  struct Context {
    BatchFormat format = BatchFormat::kFerry;
    RequestParams defaults;
    Shard shard;
    bool record_bad = false;
    const Tokenizer* tok = nullptr;
    const ModelConfig* config = nullptr;
    const std::optional<ChatFormat>* chat = nullptr;
    const ChatTemplate* chat_template = nullptr;  // parsed chat->chat_template, or null
    std::string chat_error;                       // why there is none
    std::time_t now = 0;
  };

  static absl::StatusOr<RequestReader> Open(const std::string& path, const Context& ctx) {
    FERRY_RETURN_IF_ERROR(RequireRegularFile(path));
    RequestReader r;
    r.path_ = path;
    r.ctx_ = ctx;
    r.in_ = std::make_unique<std::ifstream>(path, std::ios::binary);
    if (!*r.in_) return absl::PermissionDeniedError(absl::StrCat("cannot open ", path));
    return r;
  }

  // The next request of this shard, or nullopt at the end of the file.
  absl::StatusOr<std::optional<Item>> Next() {
    std::string line;
    while (std::getline(*in_, line)) {
      ++line_no_;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (Blank(line)) continue;
      const int64_t index = count_++;
      auto parsed = ParseBatchRequest(line, ctx_.format, index, ctx_.defaults);
      if (!parsed.ok()) return Error(std::string(parsed.status().message()));
      if (ctx_.format == BatchFormat::kOpenAI && !seen_.insert(parsed->key).second) {
        return Error(absl::StrCat("custom_id \"", parsed->key, "\" appears twice"));
      }
      if (!InShard(ctx_.shard, index, parsed->key)) continue;
      Item item;
      item.index = index;
      item.req = std::move(*parsed);
      if (item.req.error.empty()) Prepare(&item);
      if (!item.req.error.empty() && !ctx_.record_bad) {
        return Error(absl::StrCat(item.req.error, " (--on-bad-request=record writes it as an error record and runs the rest)"));
      }
      return std::optional<Item>(std::move(item));
    }
    if (in_->bad()) return absl::DataLossError(absl::StrCat(path_, ": read error after line ", line_no_));
    return std::optional<Item>();
  }

 private:
  // The prompt's token ids; a problem goes to item->req.error.
  void Prepare(Item* item) {
    BatchRequest& r = item->req;
    absl::StatusOr<std::vector<int>> ids;
    if (r.kind == BatchRequest::kChat) {
      if (ctx_.chat_template == nullptr) {
        r.error = ctx_.chat_error;
        return;
      }
      auto text = ctx_.chat_template->Render(ChatContext(r.messages, **ctx_.chat, true), ctx_.now);
      if (!text.ok()) {
        r.error = std::string(text.status().message());
        return;
      }
      ids = ctx_.tok->EncodeNoPrefix(*text);  // the template writes BOS itself, as transformers tokenizes it
    } else if (!r.prompt_ids.empty()) {
      for (int id : r.prompt_ids) {
        if (id >= ctx_.config->vocab_size) {
          r.error = absl::StrCat("prompt token ", id, " is outside the vocabulary of ", ctx_.config->vocab_size);
          return;
        }
      }
      ids = r.prompt_ids;
    } else {
      ids = ctx_.tok->Encode(r.prompt);
    }
    if (!ids.ok()) {
      r.error = std::string(ids.status().message());
      return;
    }
    absl::Status fits = ValidatePromptLength(*ctx_.config, ids->size());
    if (!fits.ok()) {
      r.error = std::string(fits.message());
      return;
    }
    item->ids = std::move(*ids);
  }

  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ":", line_no_, ": ", what));
  }

  std::string path_;
  Context ctx_;
  std::unique_ptr<std::ifstream> in_;
  int64_t line_no_ = 0;
  int64_t count_ = 0;
  std::unordered_set<std::string> seen_;
};

// How much of an existing output file a resumed job keeps: the bytes of its complete lines, each
// of which must be the record of this shard's request at the same place; `reader` is left after
// those requests. Streams the file (an output of millions of records need not fit in memory).
absl::StatusOr<uint64_t> CheckResumable(const std::string& out_path, const std::string& input_path, BatchFormat format,
                                        RequestReader& reader, int64_t* lines) {
  std::ifstream in(out_path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat("cannot read ", out_path));
  uint64_t keep = 0;
  *lines = 0;
  for (std::string line; std::getline(in, line);) {
    if (in.eof()) break;  // no newline after it: torn by an interrupted write, dropped
    const std::string where = absl::StrCat(out_path, ":", *lines + 1);
    auto key = RecordKey(line, format);
    if (!key.ok()) return absl::DataLossError(absl::StrCat(where, ": ", key.status().message(), "; cannot resume"));
    FERRY_ASSIGN_OR_RETURN(std::optional<Item> item, reader.Next());
    if (!item) return absl::InvalidArgumentError(absl::StrCat(out_path, " has more records than ", input_path, " has requests for it"));
    if (*key != item->req.key) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": id ", *key, " is not the input's ", item->req.key,
                                                     ": this output belongs to another input or shard"));
    }
    keep += line.size() + 1;
    ++*lines;
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(out_path, ": read error"));
  return keep;
}

// Requests that can share a batch: the same sampling settings (and so one GenerateOptions).
using GroupKey = std::tuple<int, int, float, int, float, bool, uint64_t>;
GroupKey KeyOf(const RequestParams& p) {
  return {p.max_tokens, p.min_tokens, p.temperature, p.top_k, p.top_p, p.seed.has_value(), p.seed.value_or(0)};
}

}  // namespace

absl::StatusOr<Shard> ParseShard(const std::string& spec) {
  Shard s;
  const auto parse = [](std::string_view text, int64_t* v) { return absl::SimpleAtoi(std::string(text), v); };
  if (spec == "auto" || spec.empty()) {
    const char* task = std::getenv("SLURM_ARRAY_TASK_ID");
    const char* count = std::getenv("SLURM_ARRAY_TASK_COUNT");
    const char* k8s = std::getenv("JOB_COMPLETION_INDEX");
    if (task != nullptr && *task != 0) {
      int64_t id = 0, n = 0, min = 0, step = 1;
      if (!parse(task, &id) || count == nullptr || !parse(count, &n)) {
        return absl::InvalidArgumentError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not a number; pass --shard I/N");
      }
      if (const char* m = std::getenv("SLURM_ARRAY_TASK_MIN"); m != nullptr && !parse(m, &min)) min = 0;
      if (const char* st = std::getenv("SLURM_ARRAY_TASK_STEP"); st != nullptr && (!parse(st, &step) || step <= 0)) step = 1;
      s.index = (id - min) / step;
      s.count = n;
    } else if (k8s != nullptr && *k8s != 0) {
      const char* n = std::getenv("FERRY_SHARD_COUNT");
      if (!parse(k8s, &s.index) || n == nullptr || !parse(n, &s.count)) {
        return absl::InvalidArgumentError("JOB_COMPLETION_INDEX is set but FERRY_SHARD_COUNT (the job's completions) is not; pass --shard I/N");
      }
    } else {
      return s;
    }
    if (s.count <= 0 || s.index < 0 || s.index >= s.count) {
      return absl::InvalidArgumentError(absl::StrCat("shard ", s.index, " of ", s.count, " from the environment is out of range; pass --shard I/N"));
    }
    return s;
  }
  std::vector<std::string> parts = absl::StrSplit(spec, '/');
  if (parts.size() != 2 || !parse(parts[0], &s.index) || !parse(parts[1], &s.count) || s.count <= 0 || s.count > 1000000 ||
      s.index < 0 || s.index >= s.count) {
    return absl::InvalidArgumentError(absl::StrCat("--shard must be I/N with 0 <= I < N <= 1000000, or auto; got \"", spec, "\""));
  }
  return s;
}

bool InShard(const Shard& shard, int64_t index, const std::string& key) {
  if (shard.count <= 1) return true;
  const uint64_t n = static_cast<uint64_t>(shard.count);
  const uint64_t which = shard.by_id ? StableHash(key) % n : static_cast<uint64_t>(index) % n;
  return which == static_cast<uint64_t>(shard.index);
}

std::string ShardOutputPath(const std::string& output, const Shard& shard) {
  if (shard.count <= 1) return output;
  char buf[48];
  std::snprintf(buf, sizeof(buf), ".shard-%05lld-of-%05lld", static_cast<long long>(shard.index), static_cast<long long>(shard.count));
  return output + buf;
}

absl::Status RefuseExistingOutput(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && st.st_size > 0) {
    return absl::AlreadyExistsError(absl::StrCat(path, " already holds output; pass --resume to continue it or --overwrite to replace it"));
  }
  return absl::OkStatus();
}

absl::Status RunGenerateJob(Model& model, const Tokenizer& tokenizer, const GenerateJobOptions& o) {
  if (o.batch_size <= 0) return absl::InvalidArgumentError(absl::StrCat("batch size must be positive, got ", o.batch_size));
  if (o.window_batches <= 0) return absl::InvalidArgumentError("window_batches must be positive");
  FERRY_RETURN_IF_ERROR(ValidateGenerateOptions(o.generate));
  const bool to_stdout = o.output_path.empty() || o.output_path == "-";
  if (o.resume && o.overwrite) return absl::InvalidArgumentError("--resume and --overwrite exclude each other");
  if (o.resume && to_stdout) return absl::InvalidArgumentError("--resume needs an --output file");
  if (o.shard.count > 1 && to_stdout) return absl::InvalidArgumentError("a sharded job needs an --output file (each shard writes its own)");
  FERRY_RETURN_IF_ERROR(RequireRegularFile(o.input_path));
  FERRY_ASSIGN_OR_RETURN(const BatchFormat format, FileFormat(o.input_path, o.format));
  const std::string output_path = to_stdout ? o.output_path : ShardOutputPath(o.output_path, o.shard);

  // A template ferry cannot run matters only to chat requests: each names the problem.
  std::optional<ChatTemplate> chat_template;
  std::string chat_error =
      "the model has no chat template (tokenizer_config.json chat_template, chat_template.jinja, or GGUF tokenizer.chat_template)";
  if (o.chat) {
    auto t = ChatTemplate::Parse(o.chat->chat_template);
    if (t.ok()) {
      chat_template = std::move(*t);
    } else {
      chat_error = absl::StrCat("the model's ", t.status().message());
    }
  }
  const int64_t created = ModificationTime(o.input_path);
  RequestReader::Context ctx;
  ctx.format = format;
  ctx.defaults.max_tokens = o.generate.max_new_tokens;
  ctx.defaults.min_tokens = o.generate.min_new_tokens;
  ctx.defaults.temperature = o.generate.sampling.temperature;
  ctx.defaults.top_k = o.generate.sampling.top_k;
  ctx.defaults.top_p = o.generate.sampling.top_p;
  ctx.defaults.stop = o.stop;
  ctx.shard = o.shard;
  ctx.record_bad = o.record_bad_requests;
  ctx.tok = &tokenizer;
  ctx.config = &model.config();
  ctx.chat = &o.chat;
  ctx.chat_template = chat_template ? &*chat_template : nullptr;
  ctx.chat_error = chat_error;
  ctx.now = static_cast<std::time_t>(created);  // strftime_now in templates: the input's time, so reruns match

  // Pass 1: validate everything before any work.
  int64_t total = 0, bad = 0;
  {
    FERRY_ASSIGN_OR_RETURN(RequestReader reader, RequestReader::Open(o.input_path, ctx));
    for (;;) {
      FERRY_ASSIGN_OR_RETURN(std::optional<Item> item, reader.Next());
      if (!item) break;
      ++total;
      bad += item->req.error.empty() ? 0 : 1;
    }
  }
  if (o.show_progress && bad > 0) {
    std::fprintf(stderr, "ferry: %lld of %lld requests cannot be served; they get error records\n", static_cast<long long>(bad),
                 static_cast<long long>(total));
  }
  // Pass 2 reads the requests again; a resumed job first skips those already in the output. The
  // output is opened (and locked) before it is looked at, so no other job changes it meanwhile.
  FERRY_ASSIGN_OR_RETURN(RequestReader reader, RequestReader::Open(o.input_path, ctx));
  int64_t skip = 0;  // requests already in the output
  FERRY_ASSIGN_OR_RETURN(RecordFile out, RecordFile::Open(output_path, o.input_path));
  FERRY_ASSIGN_OR_RETURN(const uint64_t existing, out.Size());
  const std::string params_path = output_path + ".job.json";
  nlohmann::json parameters = o.parameters;
  parameters["format"] = format == BatchFormat::kOpenAI ? "openai" : "ferry";
  parameters["shard"] = absl::StrCat(o.shard.index, "/", o.shard.count, o.shard.by_id ? " by id" : "");
  parameters["stop"] = o.stop;
  parameters["on_bad_request"] = o.record_bad_requests ? "record" : "fail";
  if (!to_stdout && !o.overwrite && !o.resume && existing > 0) FERRY_RETURN_IF_ERROR(RefuseExistingOutput(output_path));
  if (!to_stdout && o.resume && existing > 0) {
    // The records must be this input's, and made with these settings.
    FERRY_ASSIGN_OR_RETURN(const uint64_t keep, CheckResumable(output_path, o.input_path, format, reader, &skip));
    auto recorded = ReadFileToString(params_path);
    if (recorded.ok()) {
      const nlohmann::json before = JsonDepth(*recorded) > 64 ? json() : nlohmann::json::parse(*recorded, nullptr, false);
      if (before != parameters) {
        std::string what;
        for (auto it = parameters.begin(); it != parameters.end(); ++it) {
          if (!before.is_object() || !before.contains(it.key()) || before[it.key()] != it.value()) {
            what = absl::StrCat(it.key(), " was ", before.is_object() && before.contains(it.key()) ? before[it.key()].dump() : "unset",
                                ", now ", it.value().dump());
            break;
          }
        }
        return absl::InvalidArgumentError(absl::StrCat("--resume: ", output_path, " was made with other settings (",
                                                       what.empty() ? "see " + params_path : what,
                                                       "); resume with the same flags or --overwrite"));
      }
    }
    if (keep < existing) FERRY_RETURN_IF_ERROR(out.Truncate(keep));  // the torn last line of a killed job
    if (skip == total) {
      if (o.show_progress) std::fprintf(stderr, "ferry: %s is complete (%lld records)\n", output_path.c_str(), static_cast<long long>(total));
      return out.Close();
    }
    if (o.show_progress && skip > 0) {
      std::fprintf(stderr, "ferry: resuming after %lld of %lld records\n", static_cast<long long>(skip), static_cast<long long>(total));
    }
  }
  if (!to_stdout) {
    if (o.overwrite) FERRY_RETURN_IF_ERROR(out.Truncate(0));
    FERRY_RETURN_IF_ERROR(WriteFileAtomically(params_path, parameters.dump(1)));
  }
  if (o.show_progress && o.shard.count > 1) {
    std::fprintf(stderr, "ferry: shard %lld of %lld: %lld records -> %s\n", static_cast<long long>(o.shard.index),
                 static_cast<long long>(o.shard.count), static_cast<long long>(total), output_path.c_str());
  }

  // Pass 2: generate window by window, writing as we go.
  const auto start = std::chrono::steady_clock::now();
  int64_t done = skip, generated = 0;
  const size_t window = static_cast<size_t>(o.batch_size) * static_cast<size_t>(o.window_batches);
  const std::string model_name = o.model_name;
  auto progress = [&] {
    if (!o.show_progress) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double rate = s > 0 ? generated / s : 0.0, record_rate = s > 0 ? (done - skip) / s : 0.0;
    const double eta = record_rate > 0 ? (total - done) / record_rate : 0.0;
    std::fprintf(stderr, "ferry: %lld/%lld records, %lld tokens, %.1f tok/s, %.0f s left\n", static_cast<long long>(done),
                 static_cast<long long>(total), static_cast<long long>(generated), rate, eta);
  };
  absl::Status status;
  for (bool eof = false; !eof && status.ok();) {
    std::vector<Item> items;
    while (items.size() < window) {
      auto next = reader.Next();
      if (!next.ok()) {
        status = next.status();
        break;
      }
      if (!next->has_value()) {
        eof = true;
        break;
      }
      items.push_back(std::move(**next));
    }
    if (!status.ok() || items.empty()) break;
    std::vector<std::string> lines(items.size());
    std::vector<bool> ready(items.size(), false);
    size_t flushed = 0;
    // Writes the window's completed prefix (whole records, or nothing of them).
    auto flush = [&]() -> absl::Status {
      std::string block;
      size_t end = flushed;
      while (end < items.size() && ready[end]) block += lines[end++] + "\n";
      if (block.empty()) return absl::OkStatus();
      FERRY_RETURN_IF_ERROR(out.Append(block));
      flushed = end;
      return absl::OkStatus();
    };
    // Bucket: the window's servable requests by sampling settings, each group by prompt length.
    std::map<GroupKey, std::vector<size_t>> groups;
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].req.error.empty()) {
        lines[i] = ErrorRecord(format, items[i].req, items[i].req.error);
        ready[i] = true;
        ++done;
      } else {
        groups[KeyOf(items[i].req.params)].push_back(i);
      }
    }
    for (auto& group : groups) {
      std::vector<size_t>& members = group.second;
      std::stable_sort(members.begin(), members.end(), [&](size_t a, size_t b) { return items[a].ids.size() < items[b].ids.size(); });
      const RequestParams& p = items[members[0]].req.params;
      GenerateOptions g = o.generate;
      g.max_new_tokens = p.max_tokens;
      g.min_new_tokens = p.min_tokens;
      g.sampling = {p.temperature, p.top_k, p.top_p, p.seed.value_or(o.generate.sampling.seed)};
      for (size_t b0 = 0; b0 < members.size() && status.ok(); b0 += static_cast<size_t>(o.batch_size)) {
        const size_t b1 = std::min(members.size(), b0 + static_cast<size_t>(o.batch_size));
        std::vector<GenerationRequest> requests;
        for (size_t k = b0; k < b1; ++k) {
          const Item& it = items[members[k]];
          // A request's own seed starts its own stream; otherwise the stream is its input index.
          requests.push_back({it.ids, it.req.params.seed ? 0 : static_cast<uint64_t>(it.index)});
        }
        std::function<bool(int, const std::vector<int>&)> stop_check = [&](int s, const std::vector<int>& tokens) {
          const auto& stops = items[members[b0 + static_cast<size_t>(s)]].req.params.stop;
          if (stops.empty()) return false;
          auto text = tokenizer.Decode(tokens);
          return text.ok() && FindStop(*text, stops) != std::string::npos;
        };
        g.stop_check = &stop_check;
        auto results = Generate(model, requests, g);
        if (!results.ok()) {
          status = results.status();
          break;
        }
        for (size_t k = b0; k < b1; ++k) {
          const Item& it = items[members[k]];
          GenerationResult& res = (*results)[k - b0];
          auto text = tokenizer.Decode(res.tokens);
          if (!text.ok()) {
            status = text.status();
            break;
          }
          Completion c;
          c.text = std::move(*text);
          c.finish_reason = res.finish_reason;
          if (const size_t cut = FindStop(c.text, it.req.params.stop); cut != std::string::npos) {
            c.text.resize(cut);
            c.finish_reason = "stop";
          }
          c.token_ids = std::move(res.tokens);
          c.prompt_tokens = static_cast<int64_t>(it.ids.size());
          generated += static_cast<int64_t>(c.token_ids.size());
          lines[members[k]] = CompletionRecord(format, it.req, c, model_name, created);
          ready[members[k]] = true;
          ++done;
        }
        if (status.ok()) status = flush();
        progress();
      }
      if (!status.ok()) break;
    }
    if (status.ok()) status = flush();
  }
  absl::Status closed = out.Close();
  FERRY_RETURN_IF_ERROR(status);
  return closed;
}

absl::Status MergeShards(const MergeOptions& o) {
  if (o.shard_paths.empty()) return absl::InvalidArgumentError("ferry merge needs the shard outputs to join");
  if (o.output_path.empty() || o.output_path == "-") return absl::InvalidArgumentError("ferry merge needs an --output file");
  if (!o.overwrite) FERRY_RETURN_IF_ERROR(RefuseExistingOutput(o.output_path));
  FERRY_RETURN_IF_ERROR(RequireRegularFile(o.input_path));
  FERRY_ASSIGN_OR_RETURN(const BatchFormat format, FileFormat(o.input_path, o.format));
  // The input's ids, in order; they must be unique to match records to requests.
  std::vector<std::string> keys;
  {
    std::ifstream in(o.input_path, std::ios::binary);
    if (!in) return absl::PermissionDeniedError(absl::StrCat("cannot open ", o.input_path));
    std::unordered_set<std::string> seen;
    int64_t line_no = 0;
    for (std::string line; std::getline(in, line);) {
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (Blank(line)) continue;
      auto r = ParseBatchRequest(line, format, static_cast<int64_t>(keys.size()), {});
      if (!r.ok()) return absl::InvalidArgumentError(absl::StrCat(o.input_path, ":", line_no, ": ", r.status().message()));
      if (!seen.insert(r->key).second) {
        return absl::InvalidArgumentError(absl::StrCat(o.input_path, ":", line_no, ": id ", r->key,
                                                       " appears twice; merge matches records to requests by id"));
      }
      keys.push_back(std::move(r->key));
    }
    if (in.bad()) return absl::DataLossError(absl::StrCat(o.input_path, ": read error"));
  }
  // Each shard lists its records in input order: a k-way merge over the shards' next records.
  struct Cursor {
    std::string path;
    std::unique_ptr<std::ifstream> in;
    std::string line, key;
    int64_t line_no = 0;
    bool has = false;
  };
  std::vector<Cursor> cursors(o.shard_paths.size());
  const auto advance = [&](Cursor& c) -> absl::Status {
    c.has = false;
    std::string line;
    if (!std::getline(*c.in, line)) {
      if (c.in->bad()) return absl::DataLossError(absl::StrCat(c.path, ": read error"));
      return absl::OkStatus();
    }
    ++c.line_no;
    if (c.in->eof()) {
      return absl::DataLossError(absl::StrCat(c.path, ":", c.line_no, ": a torn last record (the shard was killed mid-write); resume it with ferry generate --resume first"));
    }
    auto key = RecordKey(line, format);
    if (!key.ok()) return absl::DataLossError(absl::StrCat(c.path, ":", c.line_no, ": ", key.status().message()));
    c.line = std::move(line);
    c.key = std::move(*key);
    c.has = true;
    return absl::OkStatus();
  };
  for (size_t i = 0; i < cursors.size(); ++i) {
    cursors[i].path = o.shard_paths[i];
    FERRY_RETURN_IF_ERROR(RequireRegularFile(cursors[i].path));
    if (cursors[i].path == o.output_path) return absl::InvalidArgumentError(absl::StrCat(cursors[i].path, " is both a shard and the output"));
    cursors[i].in = std::make_unique<std::ifstream>(cursors[i].path, std::ios::binary);
    if (!*cursors[i].in) return absl::PermissionDeniedError(absl::StrCat("cannot open ", cursors[i].path));
    FERRY_RETURN_IF_ERROR(advance(cursors[i]));
  }
  const std::string tmp = o.output_path + ".tmp";
  FERRY_ASSIGN_OR_RETURN(RecordFile out, RecordFile::Open(tmp, o.input_path));
  FERRY_RETURN_IF_ERROR(out.Truncate(0));
  std::vector<std::string> missing, duplicated;
  int64_t n_missing = 0, n_duplicated = 0, written = 0;
  std::string block;
  absl::Status status;
  for (const std::string& key : keys) {
    int found = 0;
    for (Cursor& c : cursors) {
      if (!c.has || c.key != key) continue;
      if (found++ == 0) block += c.line + "\n";
      status = advance(c);
      if (!status.ok()) break;
    }
    if (!status.ok()) break;
    if (found == 0 && n_missing++ < 10) missing.push_back(key);
    if (found > 1 && n_duplicated++ < 10) duplicated.push_back(key);
    written += found > 0 ? 1 : 0;
    if (block.size() > (size_t{4} << 20)) {
      status = out.Append(block);
      block.clear();
      if (!status.ok()) break;
    }
  }
  std::vector<std::string> extra;
  int64_t n_extra = 0;
  for (Cursor& c : cursors) {
    while (status.ok() && c.has) {
      if (n_extra++ < 10) extra.push_back(absl::StrCat(c.key, " (", c.path, ":", c.line_no, ")"));
      status = advance(c);
    }
  }
  if (status.ok() && !block.empty()) status = out.Append(block);
  absl::Status closed = out.Close();
  const auto names = [](const std::vector<std::string>& ids, int64_t n) {
    std::string s;
    for (const std::string& id : ids) s += (s.empty() ? "" : ", ") + id;
    return n > static_cast<int64_t>(ids.size()) ? absl::StrCat(s, ", ...") : s;
  };
  if (status.ok() && closed.ok()) {
    if (n_missing > 0 || n_duplicated > 0 || n_extra > 0) {
      std::string what;
      if (n_missing > 0) what += absl::StrCat(n_missing, " records in no shard: ", names(missing, n_missing));
      if (n_duplicated > 0) what += absl::StrCat(what.empty() ? "" : "; ", n_duplicated, " records in several shards: ", names(duplicated, n_duplicated));
      if (n_extra > 0) {
        what += absl::StrCat(what.empty() ? "" : "; ", n_extra, " records not in the input (or out of its order): ", names(extra, n_extra));
      }
      status = absl::FailedPreconditionError(absl::StrCat("ferry merge: ", what));
    }
  }
  if (!status.ok() || !closed.ok()) {
    ::unlink(tmp.c_str());
    FERRY_RETURN_IF_ERROR(status);
    return closed;
  }
  if (::rename(tmp.c_str(), o.output_path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", o.output_path, ": ", std::strerror(err)));
  }
  if (o.show_progress) {
    std::fprintf(stderr, "ferry: merged %lld records from %zu shards into %s\n", static_cast<long long>(written), o.shard_paths.size(),
                 o.output_path.c_str());
  }
  return absl::OkStatus();
}

}  // namespace ferry::engine
