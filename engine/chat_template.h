// Chat templates: the Jinja subset that the chat templates of the supported families use (Llama 3,
// Qwen2/ChatML, Qwen3, Mistral, SmolLM2, Gemma), rendered as transformers renders them (Jinja2's
// ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loop controls; its tojson;
// raise_exception and strftime_now as globals), so a rendered prompt equals transformers' byte for
// byte. scripts/make_chat_template_vectors.py renders the same templates with Debian's
// python3-jinja2 in that environment for the tests.
//
// Supported: text, {{ }}, {% %}, {# #} with '-' whitespace control; if/elif/else, for (tuple
// targets, `if` filter, else, loop.index/index0/revindex/revindex0/first/last/length/previtem/
// nextitem), set (names, namespace attributes), break, continue; literals, lists, dicts, tuples;
// the operators of Jinja's grammar with its precedence; attribute, item and slice access; the
// filters, tests, globals and string/dict methods listed in chat_template.cc. Everything else
// (macro, call, include, extends, block, raw, filter blocks, set blocks, unknown filters, tests and
// functions) is refused by name when the template is parsed; an unknown method when it is called.
#pragma once

#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {

struct ChatTemplateLimits {
  size_t max_output_bytes = size_t{16} << 20;  // a render writing more is refused
  int64_t max_loop_iterations = int64_t{1} << 20;  // all loops of one render together
};

class ChatTemplate {
 public:
  // kInvalidArgument for a syntax error or an unsupported construct (named, with its line).
  static absl::StatusOr<ChatTemplate> Parse(std::string_view source);
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // `context`: the template's variables (messages, add_generation_prompt, bos_token, ...), a JSON
  // object whose keys keep their order (as Python's dicts do: tojson writes them in that order). `now`: what strftime_now formats (UTC). raise_exception and runtime errors (a type
  // error, an undefined value used) are kInvalidArgument naming the template's message.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context, std::time_t now,
                                     const ChatTemplateLimits& limits = {}) const;

  struct Impl;

 private:
  explicit ChatTemplate(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// What a model's directory or GGUF file says about its chat format: the template and the special
// tokens a template refers to.
struct ChatFormat {
  std::string chat_template;
  std::string bos_token, eos_token;
};

// From DIR/tokenizer_config.json ("chat_template": a string, or a list of {name, template} of
// which "default" is taken; bos_token/eos_token as strings or {"content": ...}), or
// DIR/chat_template.jinja, or a GGUF file's tokenizer.chat_template (and its BOS/EOS tokens).
// nullopt when the model has none.
absl::StatusOr<std::optional<ChatFormat>> LoadChatFormat(const std::string& model_path);

// The context transformers' apply_chat_template passes: messages, tools and documents (null),
// add_generation_prompt, and the special tokens.
nlohmann::ordered_json ChatContext(const nlohmann::ordered_json& messages, const ChatFormat& format, bool add_generation_prompt);

}  // namespace ferry::engine
