#include "engine/jobs.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using nlohmann::json;

struct Prompt {
  json id;
  std::string text;
  std::vector<int> ids;
};

// Reads JSONL prompts one line at a time; blank lines are skipped.
class PromptReader {
 public:
  static absl::StatusOr<PromptReader> Open(const std::string& path, const Tokenizer* tok, const ModelConfig* config) {
    if (!PathExists(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    PromptReader r;
    r.path_ = path;
    r.tok_ = tok;
    r.config_ = config;
    r.in_ = std::make_unique<std::ifstream>(path, std::ios::binary);
    if (!*r.in_) return absl::PermissionDeniedError(absl::StrCat("cannot open ", path));
    return r;
  }

  // Next prompt, or nullopt at the end of the file.
  absl::StatusOr<std::optional<Prompt>> Next() {
    std::string line;
    while (std::getline(*in_, line)) {
      ++line_no_;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      auto parsed = ParseJobLine(line);
      if (!parsed.ok()) return Error(std::string(parsed.status().message()));
      Prompt p;
      p.text = std::move(parsed->prompt);
      p.id = parsed->has_id ? std::move(parsed->id) : json(count_);
      auto ids = tok_->Encode(p.text);
      if (!ids.ok()) return Error(std::string(ids.status().message()));
      p.ids = std::move(*ids);
      absl::Status fits = ValidatePromptLength(*config_, p.ids.size());
      if (!fits.ok()) return Error(std::string(fits.message()));
      ++count_;
      return std::optional<Prompt>(std::move(p));
    }
    if (in_->bad()) return absl::DataLossError(absl::StrCat(path_, ": read error after line ", line_no_));
    return std::optional<Prompt>();
  }

 private:
  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ":", line_no_, ": ", what));
  }
  std::string path_;
  const Tokenizer* tok_ = nullptr;
  const ModelConfig* config_ = nullptr;
  std::unique_ptr<std::ifstream> in_;
  int64_t line_no_ = 0;
  int64_t count_ = 0;
};

// How much of an existing output file a resumed job keeps: the bytes of its complete lines, each
// of which must be a record whose id is that of the input's prompt at the same index; `reader`
// is left after those prompts. Streams the file (an output of millions of records need not fit
// in memory).
absl::StatusOr<uint64_t> CheckResumable(const std::string& out_path, const std::string& input_path, PromptReader& reader,
                                        int64_t* lines) {
  std::ifstream in(out_path, std::ios::binary);
  if (!in) return absl::PermissionDeniedError(absl::StrCat("cannot read ", out_path));
  uint64_t keep = 0;
  *lines = 0;
  for (std::string line; std::getline(in, line);) {
    if (in.eof()) break;  // no newline after it: torn by an interrupted write, dropped
    const json rec = JsonDepth(line) > 64 ? json() : json::parse(line, nullptr, false);
    const std::string where = absl::StrCat(out_path, ":", *lines + 1);
    if (rec.is_discarded() || !rec.is_object() || !rec.contains("id") || !rec.contains("completion")) {
      return absl::DataLossError(absl::StrCat(where, ": not an output record; cannot resume"));
    }
    FERRY_ASSIGN_OR_RETURN(std::optional<Prompt> p, reader.Next());
    if (!p) return absl::InvalidArgumentError(absl::StrCat(out_path, " has more records than ", input_path, " has prompts"));
    if (rec["id"] != p->id) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": id ", rec["id"].dump(), " is not the input's ", p->id.dump(),
                                                     ": this output belongs to another input"));
    }
    keep += line.size() + 1;
    ++*lines;
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(out_path, ": read error"));
  return keep;
}

}  // namespace

absl::StatusOr<JobLine> ParseJobLine(std::string_view line) {
  if (JsonDepth(line) > 64) return absl::InvalidArgumentError("JSON nested deeper than 64 levels");
  json j = json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("not a JSON object");
  if (!j.contains("prompt") || !j["prompt"].is_string()) return absl::InvalidArgumentError("needs a string \"prompt\"");
  JobLine l;
  l.prompt = j["prompt"].get<std::string>();
  if (j.contains("id")) l.id = j["id"], l.has_id = true;
  return l;
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
  FERRY_RETURN_IF_ERROR(ValidateGenerateOptions(o.generate));
  // Pass 1: validate everything before any work.
  int64_t total = 0;
  {
    FERRY_ASSIGN_OR_RETURN(PromptReader reader, PromptReader::Open(o.input_path, &tokenizer, &model.config()));
    for (;;) {
      FERRY_ASSIGN_OR_RETURN(std::optional<Prompt> p, reader.Next());
      if (!p) break;
      ++total;
    }
  }
  const bool to_stdout = o.output_path.empty() || o.output_path == "-";
  if (o.resume && o.overwrite) return absl::InvalidArgumentError("--resume and --overwrite exclude each other");
  if (o.resume && to_stdout) return absl::InvalidArgumentError("--resume needs an --output file");
  // Pass 2 reads the prompts again; a resumed job first skips those already in the output. The
  // output is opened (and locked) before it is looked at, so no other job changes it meanwhile.
  FERRY_ASSIGN_OR_RETURN(PromptReader reader, PromptReader::Open(o.input_path, &tokenizer, &model.config()));
  int64_t skip = 0;  // prompts already in the output
  FERRY_ASSIGN_OR_RETURN(RecordFile out, RecordFile::Open(o.output_path, o.input_path));
  FERRY_ASSIGN_OR_RETURN(const uint64_t existing, out.Size());
  const std::string params_path = o.output_path + ".job.json";
  if (!to_stdout && !o.overwrite && !o.resume && existing > 0) FERRY_RETURN_IF_ERROR(RefuseExistingOutput(o.output_path));
  if (!to_stdout && o.resume && existing > 0) {
    // The records must be this input's, and made with these settings.
    FERRY_ASSIGN_OR_RETURN(const uint64_t keep, CheckResumable(o.output_path, o.input_path, reader, &skip));
    auto recorded = ReadFileToString(params_path);
    if (recorded.ok()) {
      const nlohmann::json before = nlohmann::json::parse(*recorded, nullptr, false);
      if (before != o.parameters) {
        std::string what;
        for (auto it = o.parameters.begin(); it != o.parameters.end(); ++it) {
          if (!before.is_object() || !before.contains(it.key()) || before[it.key()] != it.value()) {
            what = absl::StrCat(it.key(), " was ", before.is_object() && before.contains(it.key()) ? before[it.key()].dump() : "unset",
                                ", now ", it.value().dump());
            break;
          }
        }
        return absl::InvalidArgumentError(absl::StrCat("--resume: ", o.output_path, " was made with other settings (",
                                                       what.empty() ? "see " + params_path : what,
                                                       "); resume with the same flags or --overwrite"));
      }
    }
    if (keep < existing) FERRY_RETURN_IF_ERROR(out.Truncate(keep));  // the torn last line of a killed job
    if (skip == total) {
      if (o.show_progress) std::fprintf(stderr, "ferry: %s is complete (%lld prompts)\n", o.output_path.c_str(), static_cast<long long>(total));
      return absl::OkStatus();
    }
    if (o.show_progress && skip > 0) {
      std::fprintf(stderr, "ferry: resuming after %lld of %lld prompts\n", static_cast<long long>(skip), static_cast<long long>(total));
    }
  }
  if (!to_stdout) {
    if (o.overwrite) FERRY_RETURN_IF_ERROR(out.Truncate(0));
    FERRY_RETURN_IF_ERROR(WriteFileAtomically(params_path, o.parameters.dump(1)));
  }

  // Pass 2: generate batch by batch, writing as we go.
  const auto start = std::chrono::steady_clock::now();
  int64_t done = skip, generated = 0;
  absl::Status status;
  for (bool eof = false; !eof && status.ok();) {
    std::vector<Prompt> prompts;
    std::vector<GenerationRequest> requests;
    while (static_cast<int>(prompts.size()) < o.batch_size) {
      auto p = reader.Next();
      if (!p.ok()) {
        status = p.status();
        break;
      }
      if (!p->has_value()) {
        eof = true;
        break;
      }
      requests.push_back({(*p)->ids, static_cast<uint64_t>(done + prompts.size())});
      prompts.push_back(std::move(**p));
    }
    if (!status.ok() || prompts.empty()) break;
    auto results = Generate(model, requests, o.generate);
    if (!results.ok()) {
      status = results.status();
      break;
    }
    std::string lines;
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto text = tokenizer.Decode((*results)[i].tokens);
      if (!text.ok()) {
        status = text.status();
        break;
      }
      json rec = {{"id", prompts[i].id},
                  {"prompt", prompts[i].text},
                  {"completion", *text},
                  {"token_ids", (*results)[i].tokens},
                  {"finish_reason", (*results)[i].finish_reason}};
      lines += rec.dump() + "\n";
      generated += static_cast<int64_t>((*results)[i].tokens.size());
    }
    if (!status.ok()) break;
    status = out.Append(lines);  // the batch whole, or nothing of it
    if (!status.ok()) break;
    done += static_cast<int64_t>(prompts.size());
    if (o.show_progress) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double rate = s > 0 ? generated / s : 0.0, prompt_rate = s > 0 ? (done - skip) / s : 0.0;
      const double eta = prompt_rate > 0 ? (total - done) / prompt_rate : 0.0;
      std::fprintf(stderr, "ferry: %lld/%lld prompts, %lld tokens, %.1f tok/s, %.0f s left\n", static_cast<long long>(done),
                   static_cast<long long>(total), static_cast<long long>(generated), rate, eta);
    }
  }
  absl::Status closed = out.Close();
  FERRY_RETURN_IF_ERROR(status);
  return closed;
}

}  // namespace ferry::engine
