#include "engine/batch_format.h"

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <set>

#include "absl/strings/str_cat.h"
#include "base/json.h"

namespace ferry::engine {
namespace {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr int kMaxStops = 16;
constexpr size_t kMaxStopBytes = 1024;

std::string Hex16(uint64_t h) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, h);
  return buf;
}

// body fields ferry reads, and those it accepts only at their no-op values.
const std::set<std::string>& IgnoredFields() {
  static const std::set<std::string> k = {"model", "user", "metadata", "store", "service_tier", "stream_options"};
  return k;
}

bool IsInt(const ojson& v) { return v.is_number_integer() || v.is_number_unsigned(); }

// Reads the sampling fields of a body into `p`; the first problem as a message.
std::string ReadParams(const ojson& body, bool chat, RequestParams* p) {
  for (auto it = body.begin(); it != body.end(); ++it) {
    const std::string& k = it.key();
    const ojson& v = it.value();
    if (IgnoredFields().count(k) || k == "prompt" || k == "messages") continue;
    if (k == "max_tokens" || (chat && k == "max_completion_tokens")) {
      if (v.is_null()) continue;
      if (!IsInt(v) || v.get<int64_t>() < 0 || v.get<int64_t>() > (1 << 24)) return absl::StrCat("body.", k, " must be an integer in [0, 16777216]");
      p->max_tokens = static_cast<int>(v.get<int64_t>());
    } else if (k == "min_tokens") {
      if (!IsInt(v) || v.get<int64_t>() < 0 || v.get<int64_t>() > (1 << 24)) return "body.min_tokens must be a non-negative integer";
      p->min_tokens = static_cast<int>(v.get<int64_t>());
    } else if (k == "temperature") {
      if (v.is_null()) continue;
      if (!v.is_number() || !(v.get<double>() >= 0.0 && v.get<double>() <= 2.0)) return "body.temperature must be a number in [0, 2]";
      p->temperature = v.get<float>();
    } else if (k == "top_p") {
      if (v.is_null()) continue;
      if (!v.is_number() || !(v.get<double>() > 0.0 && v.get<double>() <= 1.0)) return "body.top_p must be a number in (0, 1]";
      p->top_p = v.get<float>();
    } else if (k == "top_k") {
      if (!IsInt(v) || v.get<int64_t>() < -1 || v.get<int64_t>() > (1 << 22)) return "body.top_k must be an integer >= -1";
      p->top_k = std::max<int>(0, static_cast<int>(v.get<int64_t>()));
    } else if (k == "seed") {
      if (v.is_null()) continue;
      if (!IsInt(v)) return "body.seed must be an integer";
      p->seed = v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
    } else if (k == "stop") {
      p->stop.clear();
      if (v.is_null()) continue;
      if (v.is_string()) {
        p->stop.push_back(v.get<std::string>());
      } else if (v.is_array() && v.size() <= kMaxStops) {
        for (const ojson& s : v) {
          if (!s.is_string()) return "body.stop must be a string or a list of strings";
          p->stop.push_back(s.get<std::string>());
        }
      } else {
        return absl::StrCat("body.stop must be a string or a list of at most ", kMaxStops, " strings");
      }
      for (const std::string& s : p->stop) {
        if (s.empty() || s.size() > kMaxStopBytes) return absl::StrCat("body.stop sequences must be 1 to ", kMaxStopBytes, " bytes");
      }
    } else if (k == "n" || k == "best_of") {
      if (!v.is_null() && !(IsInt(v) && v.get<int64_t>() == 1)) return absl::StrCat("body.", k, " must be 1: ferry generates one choice per request");
    } else if (k == "stream" || k == "echo" || k == "logprobs") {
      if (!v.is_null() && !(v.is_boolean() && !v.get<bool>()) && !(k == "logprobs" && IsInt(v) && v.get<int64_t>() == 0)) {
        return absl::StrCat("body.", k, " is not supported");
      }
    } else if (k == "presence_penalty" || k == "frequency_penalty") {
      if (!v.is_null() && !(v.is_number() && v.get<double>() == 0.0)) return absl::StrCat("body.", k, " is not supported (only 0)");
    } else if (k == "logit_bias") {
      if (!v.is_null() && !(v.is_object() && v.empty())) return "body.logit_bias is not supported";
    } else {
      return absl::StrCat("body.", k, " is not supported");
    }
  }
  if (p->min_tokens > p->max_tokens) return "body.min_tokens is larger than max_tokens";
  return "";
}

// A chat message's content as the templates expect it: a string (a list of text parts joined),
// or null (an assistant message with tool calls).
std::string FlattenMessages(const ojson& messages, ojson* out) {
  if (!messages.is_array() || messages.empty()) return "body.messages must be a non-empty list";
  *out = ojson::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const ojson& m = messages[i];
    const std::string where = absl::StrCat("body.messages[", i, "]");
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) return where + " must be an object with a string \"role\"";
    ojson copy = m;
    if (m.contains("content")) {
      const ojson& c = m["content"];
      if (c.is_array()) {
        std::string text;
        for (const ojson& part : c) {
          if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string()) {
            return where + ".content: only text parts are supported";
          }
          text += part["text"].get<std::string>();
        }
        copy["content"] = text;
      } else if (!c.is_string() && !c.is_null()) {
        return where + ".content must be a string, a list of text parts, or null";
      }
    } else {
      copy["content"] = nullptr;
    }
    out->push_back(std::move(copy));
  }
  return "";
}

}  // namespace

absl::StatusOr<BatchFormat> ParseBatchFormat(std::string_view name) {
  if (name == "ferry") return BatchFormat::kFerry;
  if (name == "openai") return BatchFormat::kOpenAI;
  return absl::InvalidArgumentError(absl::StrCat("input format must be auto, ferry or openai, not \"", std::string(name), "\""));
}

BatchFormat DetectBatchFormat(std::string_view first_line) {
  if (JsonDepth(first_line) > 64) return BatchFormat::kFerry;
  const json j = json::parse(first_line, nullptr, false);
  if (j.is_object() && (j.contains("custom_id") || j.contains("body"))) return BatchFormat::kOpenAI;
  return BatchFormat::kFerry;
}

absl::StatusOr<BatchRequest> ParseBatchRequest(std::string_view line, BatchFormat format, int64_t index,
                                               const RequestParams& defaults) {
  if (JsonDepth(line) > 64) return absl::InvalidArgumentError("JSON nested deeper than 64 levels");
  const ojson j = ojson::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("not a JSON object");
  BatchRequest r;
  r.params = defaults;
  if (format == BatchFormat::kFerry) {
    if (!j.contains("prompt") || !j["prompt"].is_string()) return absl::InvalidArgumentError("needs a string \"prompt\"");
    r.kind = BatchRequest::kPrompt;
    r.prompt = j["prompt"].get<std::string>();
    r.id = j.contains("id") ? json::parse(j["id"].dump()) : json(index);
    r.key = r.id.dump();
    return r;
  }
  if (!j.contains("custom_id") || !j["custom_id"].is_string() || j["custom_id"].get<std::string>().empty()) {
    return absl::InvalidArgumentError("needs a non-empty string \"custom_id\"");
  }
  r.key = j["custom_id"].get<std::string>();
  r.id = r.key;
  const auto bad = [&](std::string message) {
    r.error = std::move(message);
    return r;
  };
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() != "custom_id" && it.key() != "method" && it.key() != "url" && it.key() != "body") {
      return bad(absl::StrCat("\"", it.key(), "\" is not a field of a batch request"));
    }
  }
  if (!j.contains("method") || j["method"] != "POST") return bad("method must be \"POST\"");
  if (!j.contains("url") || !j["url"].is_string()) return bad("needs a string \"url\"");
  const std::string url = j["url"].get<std::string>();
  if (url != "/v1/completions" && url != "/v1/chat/completions") {
    return bad(absl::StrCat("url \"", url, "\" is not served: ferry serves /v1/completions and /v1/chat/completions"));
  }
  if (!j.contains("body") || !j["body"].is_object()) return bad("needs an object \"body\"");
  const ojson& body = j["body"];
  if (body.contains("model")) {
    if (!body["model"].is_string()) return bad("body.model must be a string");
    r.model = body["model"].get<std::string>();
  }
  const bool chat = url == "/v1/chat/completions";
  if (chat) {
    r.kind = BatchRequest::kChat;
    if (body.contains("prompt")) return bad("body.prompt is for /v1/completions; a chat request has body.messages");
    if (!body.contains("messages")) return bad("needs body.messages");
    if (std::string e = FlattenMessages(body["messages"], &r.messages); !e.empty()) return bad(e);
  } else {
    r.kind = BatchRequest::kCompletion;
    if (body.contains("messages")) return bad("body.messages is for /v1/chat/completions");
    if (!body.contains("prompt")) return bad("needs body.prompt");
    const ojson& p = body["prompt"];
    if (p.is_string()) {
      r.prompt = p.get<std::string>();
    } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
      r.prompt = p[0].get<std::string>();
    } else if (p.is_array() && !p.empty() && IsInt(p[0])) {
      for (const ojson& t : p) {
        if (!IsInt(t) || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) return bad("body.prompt token ids must be non-negative integers");
        r.prompt_ids.push_back(static_cast<int>(t.get<int64_t>()));
      }
    } else if (p.is_array() && p.size() > 1) {
      return bad("body.prompt holds several prompts: give one prompt per request");
    } else {
      return bad("body.prompt must be a string, a list of one string, or a list of token ids");
    }
  }
  if (std::string e = ReadParams(body, chat, &r.params); !e.empty()) return bad(e);
  return r;
}

std::string CompletionRecord(BatchFormat format, const BatchRequest& r, const Completion& c, const std::string& model_name,
                             int64_t created) {
  if (format == BatchFormat::kFerry) {
    // Keys in sorted order (as ferry has always written them).
    json rec = {{"id", r.id}, {"prompt", r.prompt}, {"completion", c.text}, {"token_ids", c.token_ids},
                {"finish_reason", c.finish_reason}};
    return rec.dump();
  }
  const std::string h = Hex16(StableHash(r.key));
  const std::string finish = c.finish_reason == "length" ? "length" : "stop";
  const int64_t completion_tokens = static_cast<int64_t>(c.token_ids.size());
  ojson usage = {{"prompt_tokens", c.prompt_tokens}, {"completion_tokens", completion_tokens},
                 {"total_tokens", c.prompt_tokens + completion_tokens}};
  ojson body;
  const std::string model = r.model.empty() ? model_name : r.model;
  if (r.kind == BatchRequest::kChat) {
    body = {{"id", "chatcmpl-" + h}, {"object", "chat.completion"}, {"created", created}, {"model", model},
            {"choices", ojson::array({{{"index", 0}, {"message", {{"role", "assistant"}, {"content", c.text}}},
                                       {"logprobs", nullptr}, {"finish_reason", finish}}})},
            {"usage", usage}};
  } else {
    body = {{"id", "cmpl-" + h}, {"object", "text_completion"}, {"created", created}, {"model", model},
            {"choices", ojson::array({{{"index", 0}, {"text", c.text}, {"logprobs", nullptr}, {"finish_reason", finish}}})},
            {"usage", usage}};
  }
  ojson rec = {{"id", "batch_req_" + h}, {"custom_id", r.key},
               {"response", {{"status_code", 200}, {"request_id", h}, {"body", body}}}, {"error", nullptr}};
  return rec.dump();
}

std::string ErrorRecord(BatchFormat format, const BatchRequest& r, const std::string& message) {
  if (format == BatchFormat::kFerry) {
    json rec = {{"id", r.id}, {"prompt", r.prompt}, {"error", message}};
    return rec.dump();
  }
  const std::string h = Hex16(StableHash(r.key));
  ojson error = {{"message", message}, {"type", "invalid_request_error"}, {"param", nullptr}, {"code", nullptr}};
  ojson rec = {{"id", "batch_req_" + h}, {"custom_id", r.key},
               {"response", {{"status_code", 400}, {"request_id", h}, {"body", {{"error", error}}}}}, {"error", nullptr}};
  return rec.dump();
}

absl::StatusOr<std::string> RecordKey(std::string_view line, BatchFormat format) {
  if (JsonDepth(line) > 64) return absl::DataLossError("not an output record (nested deeper than 64 levels)");
  const json rec = json::parse(line, nullptr, false);
  if (rec.is_discarded() || !rec.is_object()) return absl::DataLossError("not an output record (not a JSON object)");
  if (format == BatchFormat::kFerry) {
    if (!rec.contains("id") || (!rec.contains("completion") && !rec.contains("error"))) {
      return absl::DataLossError("not an output record of ferry's format (needs \"id\" and \"completion\" or \"error\")");
    }
    return rec["id"].dump();
  }
  if (!rec.contains("custom_id") || !rec["custom_id"].is_string() || !rec.contains("response")) {
    return absl::DataLossError("not an OpenAI batch output record (needs \"custom_id\" and \"response\")");
  }
  return rec["custom_id"].get<std::string>();
}

uint64_t StableHash(std::string_view s) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  // SplitMix64's finalizer: every bit of the key reaches the low bits (shards take h mod N).
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

size_t FindStop(std::string_view text, const std::vector<std::string>& stops) {
  size_t best = std::string_view::npos;
  for (const std::string& s : stops) {
    const size_t f = text.find(s);
    if (f < best) best = f;
  }
  return best;
}

}  // namespace ferry::engine
