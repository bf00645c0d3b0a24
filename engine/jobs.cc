#include "engine/jobs.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "base/file.h"
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
      json j = json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) return Error("not a JSON object");
      if (!j.contains("prompt") || !j["prompt"].is_string()) return Error("needs a string \"prompt\"");
      Prompt p;
      p.text = j["prompt"].get<std::string>();
      p.id = j.contains("id") ? j["id"] : json(count_);
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
    const json rec = json::parse(line, nullptr, false);
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
  // Pass 2 reads the prompts again; a resumed job first skips those already in the output.
  FERRY_ASSIGN_OR_RETURN(PromptReader reader, PromptReader::Open(o.input_path, &tokenizer, &model.config()));
  int64_t skip = 0;  // prompts already in the output
  if (!to_stdout && !o.overwrite && !o.resume) FERRY_RETURN_IF_ERROR(RefuseExistingOutput(o.output_path));
  if (!to_stdout && o.resume && PathExists(o.output_path)) {
    struct stat st;
    if (::stat(o.output_path.c_str(), &st) != 0) return absl::PermissionDeniedError(absl::StrCat("cannot stat ", o.output_path));
    FERRY_ASSIGN_OR_RETURN(const uint64_t keep, CheckResumable(o.output_path, o.input_path, reader, &skip));
    if (keep < static_cast<uint64_t>(st.st_size) && ::truncate(o.output_path.c_str(), static_cast<off_t>(keep)) != 0) {
      return absl::PermissionDeniedError(absl::StrCat("cannot truncate the torn last line of ", o.output_path));
    }
    if (skip == total) {
      if (o.show_progress) std::fprintf(stderr, "ferry: %s is complete (%lld prompts)\n", o.output_path.c_str(), static_cast<long long>(total));
      return absl::OkStatus();
    }
    if (o.show_progress && skip > 0) {
      std::fprintf(stderr, "ferry: resuming after %lld of %lld prompts\n", static_cast<long long>(skip), static_cast<long long>(total));
    }
  }
  std::FILE* out = stdout;
  if (!to_stdout) {
    out = std::fopen(o.output_path.c_str(), o.resume ? "ab" : "wb");
    if (out == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot write ", o.output_path));
  }
  auto close_out = [&]() -> absl::Status {
    if (out != stdout && std::fclose(out) != 0) return absl::DataLossError(absl::StrCat("error closing ", o.output_path));
    return absl::OkStatus();
  };

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
      const std::string line = rec.dump() + "\n";
      if (std::fwrite(line.data(), 1, line.size(), out) != line.size()) {
        status = absl::DataLossError(absl::StrCat("error writing ", o.output_path.empty() ? "stdout" : o.output_path));
        break;
      }
      generated += static_cast<int64_t>((*results)[i].tokens.size());
    }
    std::fflush(out);
    done += static_cast<int64_t>(prompts.size());
    if (o.show_progress) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double rate = s > 0 ? generated / s : 0.0, prompt_rate = s > 0 ? (done - skip) / s : 0.0;
      const double eta = prompt_rate > 0 ? (total - done) / prompt_rate : 0.0;
      std::fprintf(stderr, "ferry: %lld/%lld prompts, %lld tokens, %.1f tok/s, %.0f s left\n", static_cast<long long>(done),
                   static_cast<long long>(total), static_cast<long long>(generated), rate, eta);
    }
  }
  absl::Status closed = close_out();
  FERRY_RETURN_IF_ERROR(status);
  return closed;
}

}  // namespace ferry::engine
