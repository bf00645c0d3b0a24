// Chat templates: the real templates of the supported families (Llama 3.1/3.2, Qwen2.5, Qwen3,
// Mistral Nemo and Small 3.2, Gemma 2, SmolLM2, SmolLM3) rendered on 14 conversations, with and
// without the generation prompt, byte for byte equal to Debian's python3-jinja2 in transformers'
// environment (scripts/make_chat_template_vectors.py wrote the vectors; ChatTemplateVectorsFresh
// in ctest re-renders them with python3-jinja2), errors where Jinja raises; then the whitespace
// rules, refusals by name, limits and where templates are found.
#include "engine/chat_template.h"

#include <fstream>

#include "base/file.h"
#include "gguf_util.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

using json = nlohmann::ordered_json;

const json& Vectors() {
  static const json v = [] {
    std::ifstream in(ferry::testing::DataDir() + "/chat-templates/vectors.json");
    return in.good() ? json::parse(in) : json();
  }();
  return v;
}

class ChatTemplatePeerTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ChatTemplatePeerTest, RendersEqualPythonJinja2) {
  const json& v = Vectors();
  ASSERT_TRUE(v.is_object()) << "tests/data/chat-templates/vectors.json is missing";
  const json& t = v["templates"][GetParam()];
  auto source = ReadFileToString(ferry::testing::DataDir() + "/chat-templates/" + GetParam());
  ASSERT_TRUE(source.ok()) << source.status();
  auto tmpl = ChatTemplate::Parse(*source);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  ChatFormat format{*source, t["bos_token"], t["eos_token"]};
  int texts = 0, errors = 0;
  for (const json& r : t["renders"]) {
    const json& messages = v["conversations"][r["conversation"].get<int>()];
    auto out = tmpl->Render(ChatContext(messages, format, r["add_generation_prompt"]), v["now"].get<std::time_t>());
    SCOPED_TRACE(::testing::Message() << "conversation " << r["conversation"] << " add_generation_prompt " << r["add_generation_prompt"]);
    if (r.contains("error")) {
      EXPECT_FALSE(out.ok()) << "python3-jinja2 raised " << r["error"] << " but ferry rendered:\n" << *out;
      if (!out.ok()) {
        ++errors;
        // raise_exception's message comes through.
        const std::string jinja_error = r["error"];
        if (jinja_error.rfind("TemplateError: ", 0) == 0) {
          EXPECT_NE(std::string(out.status().message()).find(jinja_error.substr(15)), std::string::npos) << out.status();
        }
      }
    } else {
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ(*out, r["text"].get<std::string>());
      ++texts;
    }
  }
  EXPECT_GT(texts, 0);
  EXPECT_EQ(texts + errors, static_cast<int>(t["renders"].size()));
}

std::vector<std::string> TemplateNames() {
  std::vector<std::string> names;
  if (Vectors().is_object()) {
    for (auto it = Vectors()["templates"].begin(); it != Vectors()["templates"].end(); ++it) names.push_back(it.key());
  }
  return names;
}

INSTANTIATE_TEST_SUITE_P(Families, ChatTemplatePeerTest, ::testing::ValuesIn(TemplateNames()),
                         [](const auto& info) { return ferry::testing::ParamName(info.param.c_str()); });

TEST(ChatTemplatePeerTest, EverySupportedFamilyHasATemplate) {
  std::string all;
  for (const auto& n : TemplateNames()) all += n + " ";
  for (const char* family : {"Llama-3", "Qwen2.5", "Qwen3", "Mistral", "gemma", "smollm2"}) {
    EXPECT_NE(all.find(family), std::string::npos) << family;
  }
}

std::string Render(const std::string& source, const json& context = json::object()) {
  auto t = ChatTemplate::Parse(source);
  if (!t.ok()) return "PARSE: " + std::string(t.status().message());
  auto out = t->Render(context, 0);
  if (!out.ok()) return "RENDER: " + std::string(out.status().message());
  return *out;
}

TEST(ChatTemplateTest, WhitespaceControlAsJinja) {
  // trim_blocks: the newline after a block tag goes; lstrip_blocks: indentation before one goes.
  EXPECT_EQ(Render("{% if true %}\n  yes\n{% endif %}\nafter"), "  yes\nafter");
  EXPECT_EQ(Render("  {% if true %}x{% endif %}"), "x");
  EXPECT_EQ(Render("a  {% if true %}x{% endif %}"), "a  x");          // not at a line's start
  EXPECT_EQ(Render("a {{- ' b ' -}} c"), "a b c");                      // '-' strips every side's whitespace
  EXPECT_EQ(Render("a\n  {#- comment -#}\n  b"), "ab");
  EXPECT_EQ(Render("x\n"), "x");                                       // one trailing newline dropped
  EXPECT_EQ(Render("{{ 'a' }}\n{{ 'b' }}"), "a\nb");                   // not after {{ }}
  EXPECT_EQ(Render("{%+ if true %}x{% endif +%}\ny"), "x\ny");
}

TEST(ChatTemplateTest, ExpressionsAsPython) {
  EXPECT_EQ(Render("{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1 ~ 2 }}"), "3 -4 2 3.5 1024 12");
  EXPECT_EQ(Render("{{ 'a' + 'b' * 3 }} {{ [1, 2] + [3] }} {{ {'k': 'v'} }} {{ none }} {{ true }}"), "abbb [1, 2, 3] {'k': 'v'} None True");
  EXPECT_EQ(Render("{{ 'abcdef'[1:4] }} {{ 'abc'[::-1] }} {{ [1,2,3][-1] }} {{ 'x' if false else 'y' }}"), "bcd cba 3 y");
  EXPECT_EQ(Render("{{ 1 < 2 < 3 }} {{ 'b' in 'abc' }} {{ 3 not in [1, 2] }} {{ 0 or 'z' }} {{ '' and 1 }}"), "True True True z ");
  EXPECT_EQ(Render("{{ '  a b  '.strip() }}|{{ 'a,b,,c'.split(',') }}|{{ 'xAy'.lower() }}|{{ 'aXa'.replace('a', 'b') }}"),
            "a b|['a', 'b', '', 'c']|xay|bXb");
  EXPECT_EQ(Render("{{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1.0 }} {{ 2.5e-7 }}"), "0.30000000000000004 1e+20 1.0 2.5e-07");
  EXPECT_EQ(Render("{{ {'b': [1, 'x', none, true], 'a': 1.5} | tojson }}"), R"({"b": [1, "x", null, true], "a": 1.5})");
  EXPECT_EQ(Render("{{ {'a': [1]} | tojson(indent=2) }}"), "{\n  \"a\": [\n    1\n  ]\n}");
  EXPECT_EQ(Render("{{ 'é\"\\n' | tojson }}"), "\"é\\\"\\n\"");
}

TEST(ChatTemplateTest, ScopesAndLoopsAsJinja) {
  // A set inside a loop does not leak out of it; a namespace carries state across iterations.
  EXPECT_EQ(Render("{% set x = 1 %}{% for i in [1,2] %}{% set x = i %}{% endfor %}{{ x }}"), "1");
  EXPECT_EQ(Render("{% set ns = namespace(n=0) %}{% for i in range(5) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}"), "10");
  EXPECT_EQ(Render("{% for i in range(10) if i is odd %}{% if i > 5 %}{% break %}{% endif %}{{ loop.index }}:{{ i }}"
                   "{% if not loop.last %},{% endif %}{% endfor %}"),
            "1:1,2:3,3:5,");
  EXPECT_EQ(Render("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% else %}empty{% endfor %}"), "a=1;b=2;");
  EXPECT_EQ(Render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(Render("{{ m | selectattr('role', 'equalto', 'user') | map(attribute='c') | join(',') }}",
                   {{"m", json::array({{{"role", "user"}, {"c", "a"}}, {{"role", "bot"}, {"c", "b"}}, {{"role", "user"}, {"c", "c"}}})}}),
            "a,c");
  EXPECT_EQ(Render("{{ x is defined }} {{ y.z is defined }} {{ x | default('d') }} {{ y | length }}", {{"y", json::object()}}),
            "False False d 0");
}

TEST(ChatTemplateTest, UnsupportedConstructsAreRefusedByName) {
  EXPECT_EQ(Render("{% macro f() %}x{% endmacro %}"), "PARSE: chat template: line 1: the tag 'macro' is not supported");
  EXPECT_EQ(Render("{{ x | wordwrap }}"), "PARSE: chat template: line 1: the filter 'wordwrap' is not supported");
  EXPECT_EQ(Render("\n{{ x is prime }}"), "PARSE: chat template: line 2: the test 'prime' is not supported");
  EXPECT_EQ(Render("{{ lipsum() }}"), "PARSE: chat template: line 1: the function 'lipsum' is not supported");
  EXPECT_EQ(Render("{% set x %}y{% endset %}"),
            "PARSE: chat template: line 1: the block form of set ({% set x %}...{% endset %}) is not supported");
  EXPECT_EQ(Render("{% include 'x' %}"), "PARSE: chat template: line 1: the tag 'include' is not supported");
  EXPECT_EQ(Render("{{ 'a'.zfill(3) }}"), "RENDER: chat template: the method str.zfill() is not supported");
  EXPECT_EQ(Render("{% if x %}"), "PARSE: chat template: line 1: missing 'endif'");
  EXPECT_EQ(Render("{{ x"), "PARSE: chat template: line 1: tag without its closing }}");
  EXPECT_EQ(Render("{{ raise_exception('no system role') }}"), "RENDER: chat template: the template raised: no system role");
  EXPECT_EQ(Render("{{ m.role.x }}"), "RENDER: chat template: 'm' is undefined (reading .role)");
  EXPECT_EQ(Render("{{ 'a' + 1 }}"), "RENDER: chat template: unsupported operand types for +: 'str' and 'int'");
}

TEST(ChatTemplateTest, RunawayTemplatesStopAtTheLimits) {
  auto t = ChatTemplate::Parse("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}");
  ASSERT_TRUE(t.ok()) << t.status();
  auto out = t->Render(json::object(), 0);
  EXPECT_FALSE(out.ok());
  EXPECT_NE(std::string(out.status().message()).find("loop iterations"), std::string::npos) << out.status();
  ChatTemplateLimits small;
  small.max_output_bytes = 1000;
  auto big = ChatTemplate::Parse("{{ 'x' * 100000 }}");
  ASSERT_TRUE(big.ok());
  EXPECT_FALSE(big->Render(json::object(), 0, small).ok());
  EXPECT_FALSE(ChatTemplate::Parse("{{ " + std::string(5000, '[') + " }}").ok());  // nesting is bounded
  EXPECT_EQ(Render("{{ " + std::string(300, '(') + "1" + std::string(300, ')') + " }}").rfind("PARSE: ", 0), 0u);
}

TEST(ChatTemplateTest, StrftimeNowFormatsTheGivenTime) {
  auto t = ChatTemplate::Parse("{{ strftime_now('%d %b %Y') }}");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t->Render(json::object(), 1772884800), "07 Mar 2026");
}

TEST(ChatFormatTest, FoundInTokenizerConfigAndGguf) {
  ferry::testing::TempDir dir;
  auto none = LoadChatFormat(dir.path());
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  ASSERT_TRUE(WriteFileAtomically(dir.File("tokenizer_config.json"),
                                  R"({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                                      "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})")
                  .ok());
  auto f = LoadChatFormat(dir.path());
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE(f->has_value());
  EXPECT_EQ((*f)->chat_template, "D");
  EXPECT_EQ((*f)->bos_token, "<s>");
  EXPECT_EQ((*f)->eos_token, "</s>");
  ASSERT_TRUE(WriteFileAtomically(dir.File("tokenizer_config.json"), R"({"chat_template": 7})").ok());
  EXPECT_EQ(LoadChatFormat(dir.path()).status().code(), absl::StatusCode::kDataLoss);

  ferry::testing::GgufBuilder b;
  b.Str("general.architecture", "llama");
  b.Str("tokenizer.chat_template", "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}");
  b.Strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>"});
  b.U32("tokenizer.ggml.bos_token_id", 1);
  b.U32("tokenizer.ggml.eos_token_id", 2);
  ASSERT_TRUE(WriteFileAtomically(dir.File("m.gguf"), b.Build()).ok());
  auto g = LoadChatFormat(dir.File("m.gguf"));
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_TRUE(g->has_value());
  auto t = ChatTemplate::Parse((*g)->chat_template);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t->Render(ChatContext(json::array({{{"role", "user"}, {"content", "hi"}}}), **g, true), 0), "<s>hi</s>");
  ferry::testing::GgufBuilder bad;
  bad.Str("tokenizer.chat_template", "x");
  bad.Strings("tokenizer.ggml.tokens", {"a"});
  bad.U32("tokenizer.ggml.bos_token_id", 5);
  ASSERT_TRUE(WriteFileAtomically(dir.File("bad.gguf"), bad.Build()).ok());
  EXPECT_EQ(LoadChatFormat(dir.File("bad.gguf")).status().code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace ferry::engine
