#include "engine/chat_template.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "engine/chat_template_internal.h"
#include "engine/gguf_model.h"
#include "io/gguf.h"

namespace ferry::engine {

using jinja::Body;
using jinja::Lex;
using jinja::ParseTemplate;
using jinja::Renderer;
using jinja::TemplateError;
using nlohmann::json;
using ojson = nlohmann::ordered_json;

struct ChatTemplate::Impl {
  Body body;
};

ChatTemplate::ChatTemplate(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  if (source.size() > (size_t{4} << 20)) return absl::InvalidArgumentError("chat template: longer than 4 MiB");
  // Jinja reads newlines as "\n" and drops one at the very end (keep_trailing_newline=False).
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();
  try {
    auto impl = std::make_unique<Impl>();
    impl->body = ParseTemplate(Lex(src));
    return ChatTemplate(std::move(impl));
  } catch (const TemplateError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.message));
  }
}

absl::StatusOr<std::string> ChatTemplate::Render(const ojson& context, std::time_t now, const ChatTemplateLimits& limits) const {
  if (!context.is_object()) return absl::InvalidArgumentError("chat template: the context must be a JSON object");
  if (JsonDepth(context.dump()) > 64) return absl::InvalidArgumentError("chat template: context nested deeper than 64 levels");
  try {
    return Renderer(limits, now).Run(impl_->body, context);
  } catch (const TemplateError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.message));
  }
}

namespace {

// A special token in tokenizer_config.json: a string, or {"content": "..."} (an AddedToken).
std::string TokenText(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

}  // namespace

absl::StatusOr<std::optional<ChatFormat>> LoadChatFormat(const std::string& model_path) {
  ChatFormat f;
  if (IsGgufFile(model_path)) {
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<io::GgufFile> file, io::GgufFile::Open(model_path));
    if (file->Find("tokenizer.chat_template") == nullptr) return std::optional<ChatFormat>();
    FERRY_ASSIGN_OR_RETURN(f.chat_template, file->String("tokenizer.chat_template"));
    const auto token = [&](const char* key) -> absl::StatusOr<std::string> {
      if (file->Find(key) == nullptr || file->Find("tokenizer.ggml.tokens") == nullptr) return std::string();
      FERRY_ASSIGN_OR_RETURN(const uint64_t id, file->Uint(key));
      FERRY_ASSIGN_OR_RETURN(const std::vector<std::string>* tokens, file->Strings("tokenizer.ggml.tokens"));
      if (id >= tokens->size()) {
        return absl::DataLossError(absl::StrCat(model_path, ": ", key, " ", id, " is outside the vocabulary"));
      }
      return (*tokens)[static_cast<size_t>(id)];
    };
    FERRY_ASSIGN_OR_RETURN(f.bos_token, token("tokenizer.ggml.bos_token_id"));
    FERRY_ASSIGN_OR_RETURN(f.eos_token, token("tokenizer.ggml.eos_token_id"));
    return std::optional<ChatFormat>(std::move(f));
  }
  const std::string config_path = model_path + "/tokenizer_config.json";
  json config = json::object();
  if (PathExists(config_path)) {
    FERRY_ASSIGN_OR_RETURN(const std::string text, ReadFileToString(config_path));
    if (JsonDepth(text) > 64) return absl::DataLossError(absl::StrCat(config_path, ": nested deeper than 64 levels"));
    config = json::parse(text, nullptr, false);
    if (config.is_discarded() || !config.is_object()) return absl::DataLossError(absl::StrCat(config_path, ": not a JSON object"));
  }
  if (config.contains("bos_token")) f.bos_token = TokenText(config["bos_token"]);
  if (config.contains("eos_token")) f.eos_token = TokenText(config["eos_token"]);
  if (config.contains("chat_template")) {
    const json& t = config["chat_template"];
    if (t.is_string()) {
      f.chat_template = t.get<std::string>();
    } else if (t.is_array()) {
      for (const json& e : t) {
        if (e.is_object() && e.value("name", json()) == "default" && e.contains("template") && e["template"].is_string()) {
          f.chat_template = e["template"].get<std::string>();
        }
      }
      if (f.chat_template.empty()) return absl::DataLossError(absl::StrCat(config_path, ": chat_template list has no \"default\" template"));
    } else if (!t.is_null()) {
      return absl::DataLossError(absl::StrCat(config_path, ": chat_template is neither a string nor a list"));
    }
  }
  if (f.chat_template.empty() && PathExists(model_path + "/chat_template.jinja")) {
    FERRY_ASSIGN_OR_RETURN(f.chat_template, ReadFileToString(model_path + "/chat_template.jinja"));
  }
  if (f.chat_template.empty()) return std::optional<ChatFormat>();
  return std::optional<ChatFormat>(std::move(f));
}

ojson ChatContext(const ojson& messages, const ChatFormat& format, bool add_generation_prompt) {
  return {{"messages", messages},
          {"tools", nullptr},
          {"documents", nullptr},
          {"add_generation_prompt", add_generation_prompt},
          {"bos_token", format.bos_token},
          {"eos_token", format.eos_token}};
}

}  // namespace ferry::engine
