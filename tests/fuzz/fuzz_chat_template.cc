// Chat templates: parse the input as a template and render it on a small conversation (with a
// tool call, so the tojson and item paths run); the limits keep a render's loops and output small.
#include <cstdint>
#include <string>

#include "engine/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto t = ferry::engine::ChatTemplate::Parse(text);
  if (!t.ok()) return 0;
  static const nlohmann::ordered_json messages = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "  sys  "},
    {"role": "user", "content": "hi \u00e9"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call12345", "type": "function",
      "function": {"name": "f", "arguments": {"a": 1, "b": [true, null, 2.5]}}}]},
    {"role": "tool", "content": "{\"x\": 1}", "tool_call_id": "call12345"},
    {"role": "user", "content": "bye"}])");
  ferry::engine::ChatFormat format{text, "<s>", "</s>"};
  ferry::engine::ChatTemplateLimits limits;
  limits.max_output_bytes = 1 << 16;
  limits.max_loop_iterations = 1 << 12;
  (void)t->Render(ferry::engine::ChatContext(messages, format, true), 0, limits);
  return 0;
}
