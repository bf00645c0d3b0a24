// Hostile files (issue 18's defects): every field of the wrong type, ids out of range, lying
// tables and deep nesting in tokenizer.json, config.json, manifest.json and JSONL give one clear
// error, never a crash, an exception, a huge allocation or a silent misreading.
#include <functional>
#include <string>

#include "base/file.h"
#include "base/json.h"
#include "engine/model_config.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "io/store.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

using nlohmann::json;

// tiny-opt's tokenizer.json, the base every case changes one thing of.
json SmallTokenizer() {
  static const json base = json::parse(*ReadFileToString(ferry::testing::ModelDir() + "/tokenizer.json"));
  return base;
}

void ExpectRefused(const json& j, const std::string& what) {
  auto t = Tokenizer::FromTokenizerJson(j.dump());
  ASSERT_FALSE(t.ok()) << j.dump();
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_NE(t.status().message().find(what), std::string::npos) << t.status();
}

TEST(HostileTokenizerTest, GoodOneLoads) {
  auto t = Tokenizer::FromTokenizerJson(SmallTokenizer().dump());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->prefix_ids(), std::vector<int>{2});
}

TEST(HostileTokenizerTest, IdsOutOfRangeAndWrongTypes) {
  json j = SmallTokenizer();
  j["added_tokens"][2]["id"] = -1;  // was a heap-buffer-overflow write
  ExpectRefused(j, "added_tokens[].id");
  j = SmallTokenizer();
  j["added_tokens"][2]["id"] = 50000000;  // was a 50M-entry table
  ExpectRefused(j, "added_tokens[].id");
  j = SmallTokenizer();
  j["model"]["vocab"]["b"] = 2147483647;  // was a signed overflow
  ExpectRefused(j, "model.vocab[b]");
  j = SmallTokenizer();
  j["model"]["vocab"]["b"] = 4294967396ull;  // 2^32 + 100 was read as 100
  ExpectRefused(j, "model.vocab[b]");
  j = SmallTokenizer();
  j["model"]["vocab"]["b"] = 1000000;  // a table far larger than the tokens
  ExpectRefused(j, "model.vocab");
  for (const auto& [path, value] : std::vector<std::pair<std::string, json>>{
           {"/model/type", 3}, {"/pre_tokenizer/type", json::array()}, {"/pre_tokenizer/add_prefix_space", "yes"},
           {"/added_tokens/2/special", 1}, {"/post_processor", "TemplateProcessing"},
           {"/post_processor/single/0/SpecialToken", 7}, {"/post_processor/special_tokens/<~1s>/ids", 2},
           {"/post_processor/special_tokens/<~1s>/ids/0", "2"}, {"/post_processor/type", 1}}) {
    json k = SmallTokenizer();
    k[json::json_pointer(path)] = value;
    auto t = Tokenizer::FromTokenizerJson(k.dump());
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << path << ": " << t.status();
  }
  // A post_processor without "single" or "ids" no longer drops the BOS silently.
  j = SmallTokenizer();
  j["post_processor"].erase("single");
  ExpectRefused(j, "post_processor.single");
  j = SmallTokenizer();
  j["post_processor"]["special_tokens"]["</s>"].erase("ids");
  ExpectRefused(j, "ids");
}

TEST(HostileTokenizerTest, DeepNestingIsRefusedBeforeParsing) {
  std::string deep = "{\"model\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  auto t = Tokenizer::FromTokenizerJson(deep);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("nested deeper"), std::string::npos) << t.status();
  EXPECT_EQ(JsonDepth("{\"a\": \"[[[[\", \"b\": [[1]]}"), 3);
}

TEST(HostileConfigTest, WrongTypesAndHugeIds) {
  auto base = ReadFileToString(ferry::testing::ModelDir() + "/config.json");
  ASSERT_TRUE(base.ok());
  for (const auto& [key, value] : std::vector<std::pair<std::string, json>>{
           {"activation_function", 3}, {"eos_token_id", 4294967298ull}, {"bos_token_id", "2"}, {"hidden_size", 2.5},
           {"do_layer_norm_before", "true"}, {"model_type", json::object()}}) {
    json j = json::parse(*base);
    j[key] = value;
    auto c = ModelConfig::FromJson(j.dump(), "config.json");
    ASSERT_FALSE(c.ok()) << key;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_NE(c.status().message().find(key), std::string::npos) << c.status();
  }
}

class HostileManifestTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(io::ConvertToStore(ferry::testing::ModelDir(), dir_.path()).ok()); }
  absl::Status OpenWith(const std::function<void(json&)>& edit) {
    json m = json::parse(*ReadFileToString(dir_.File("manifest.json")));
    edit(m);
    if (!keep_tables_hash_) m.erase("manifest_xxh3");  // each check on its own, as for a store written before it
    ferry::testing::WriteFile(dir_.File("manifest.json"), m.dump());
    return io::Store::Open(dir_.path()).status();
  }
  ferry::testing::TempDir dir_;
  bool keep_tables_hash_ = false;
};

TEST_F(HostileManifestTest, WrongTypesLiesAndPathsOutsideTheStore) {
  const std::string original = *ReadFileToString(dir_.File("manifest.json"));
  auto restore = [&] { ferry::testing::WriteFile(dir_.File("manifest.json"), original); };
  const std::vector<std::pair<std::string, std::function<void(json&)>>> cases = {
      {"format a number", [](json& m) { m["format"] = 1; }},
      {"version a string", [](json& m) { m["version"] = "1"; }},
      {"data_file a number", [](json& m) { m["data_file"] = 5; }},
      {"data_file outside", [](json& m) { m["data_file"] = "../other/weights.bin"; }},
      {"layer offset a string", [](json& m) { m["layers"][0]["offset"] = "0"; }},
      {"layers out of order", [](json& m) { std::swap(m["layers"][0], m["layers"][1]); }},
      {"layers overlap", [](json& m) { m["layers"][1]["offset"] = m["layers"][0]["offset"]; }},
      {"tensor outside its layer", [](json& m) {
         for (auto& t : m["tensors"]) if (t["layer"] == 2) t["layer"] = 3;
       }},
      {"layers a number", [](json& m) { m["layers"] = 3; }},
  };
  for (const auto& [what, edit] : cases) {
    const absl::Status s = OpenWith(edit);
    EXPECT_FALSE(s.ok()) << what;
    EXPECT_TRUE(s.code() == absl::StatusCode::kDataLoss || s.code() == absl::StatusCode::kInvalidArgument) << what << ": " << s;
    EXPECT_EQ(std::string(s.message()).find('\n'), std::string::npos);
    restore();
  }
  EXPECT_TRUE(io::Store::Open(dir_.path()).ok());
  // With the tables' checksum (every store ferry writes now), a dtype changed from F16 to BF16 (the
  // same bytes, other values) is refused, as is a tensor dropped from the table.
  keep_tables_hash_ = true;
  for (const auto& edit : std::vector<std::function<void(json&)>>{
           [](json& m) { for (auto& t : m["tensors"]) if (t["dtype"] == "F16") { t["dtype"] = "BF16"; break; } },
           [](json& m) { m["tensors"].erase(m["tensors"].begin()); }}) {
    const absl::Status s = OpenWith(edit);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(s.message().find("manifest checksum"), std::string::npos) << s;
    restore();
  }
}

}  // namespace
}  // namespace ferry::engine
