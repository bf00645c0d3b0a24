#include "engine/jobs.h"

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
  static absl::StatusOr<PromptReader> Open(const std::string& path, const Tokenizer* tok, const OptConfig* config) {
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
  const OptConfig* config_ = nullptr;
  std::unique_ptr<std::ifstream> in_;
  int64_t line_no_ = 0;
  int64_t count_ = 0;
};

}  // namespace

absl::Status RunGenerateJob(const OptModel& model, const Tokenizer& tokenizer, const GenerateJobOptions& o) {
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
  std::FILE* out = stdout;
  if (!o.output_path.empty() && o.output_path != "-") {
    out = std::fopen(o.output_path.c_str(), "wb");
    if (out == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot write ", o.output_path));
  }
  auto close_out = [&]() -> absl::Status {
    if (out != stdout && std::fclose(out) != 0) return absl::DataLossError(absl::StrCat("error closing ", o.output_path));
    return absl::OkStatus();
  };

  // Pass 2: generate batch by batch, writing as we go.
  FERRY_ASSIGN_OR_RETURN(PromptReader reader, PromptReader::Open(o.input_path, &tokenizer, &model.config()));
  const auto start = std::chrono::steady_clock::now();
  int64_t done = 0, generated = 0;
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
      std::fprintf(stderr, "ferry: %lld/%lld prompts, %lld tokens, %.1f tok/s\n", static_cast<long long>(done),
                   static_cast<long long>(total), static_cast<long long>(generated), s > 0 ? generated / s : 0.0);
    }
  }
  absl::Status closed = close_out();
  FERRY_RETURN_IF_ERROR(status);
  return closed;
}

}  // namespace ferry::engine
