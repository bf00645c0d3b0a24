#include "engine/model_config.h"

#include "gtest/gtest.h"
#include "test_util.h"

namespace ferry::engine {
namespace {

const char* kTiny = R"({"model_type": "opt", "hidden_size": 256, "ffn_dim": 1024, "num_attention_heads": 8,
  "num_hidden_layers": 6, "vocab_size": 8192, "max_position_embeddings": 512, "do_layer_norm_before": true,
  "word_embed_proj_dim": 256, "activation_function": "relu", "eos_token_id": 2, "bos_token_id": 2})";

TEST(OptConfigTest, ReadsTinyOpt) {
  auto c = ModelConfig::FromModelDir(ferry::testing::ModelDir());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 256);
  EXPECT_EQ(c->num_layers, 6);
  EXPECT_EQ(c->head_dim(), 32);
  EXPECT_TRUE(c->norm_before);
  EXPECT_TRUE(c->final_norm);
  EXPECT_FALSE(c->has_projection());
  EXPECT_TRUE(c->tie_word_embeddings);
}

TEST(OptConfigTest, Opt350mStyle) {
  auto c = ModelConfig::FromJson(R"({"model_type": "opt", "hidden_size": 1024, "ffn_dim": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 24, "vocab_size": 50272, "max_position_embeddings": 2048,
    "do_layer_norm_before": false, "word_embed_proj_dim": 512, "activation_function": "relu"})", "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->norm_before);
  EXPECT_FALSE(c->final_norm);
  EXPECT_TRUE(c->has_projection());
  EXPECT_EQ(c->word_embed_proj_dim, 512);
}

void ExpectRefused(const std::string& json, const std::string& field) {
  auto c = ModelConfig::FromJson(json, "config.json");
  ASSERT_FALSE(c.ok()) << json;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(field), std::string::npos) << c.status();
}

std::string Tweak(const std::string& key, const std::string& value) {
  std::string s = kTiny;
  const std::string needle = "\"" + key + "\": ";
  const size_t at = s.find(needle);
  if (at == std::string::npos) return s.substr(0, s.size() - 1) + ", " + needle + value + "}";
  const size_t end = s.find_first_of(",}", at);
  return s.substr(0, at + needle.size()) + value + s.substr(end);
}

TEST(OptConfigTest, RefusesWhatItCannotRunNamingTheField) {
  ExpectRefused(Tweak("model_type", "\"gpt2\""), "model_type");  // a family ferry does not have
  ExpectRefused(Tweak("activation_function", "\"gelu\""), "activation_function");
  ExpectRefused(Tweak("hidden_size", "-4"), "hidden_size");
  ExpectRefused(Tweak("num_attention_heads", "7"), "num_attention_heads");
  ExpectRefused(Tweak("layer_norm_elementwise_affine", "false"), "layer_norm_elementwise_affine");
  ExpectRefused(Tweak("do_layer_norm_before", "\"yes\""), "do_layer_norm_before");
  ExpectRefused(R"({"model_type": "opt", "hidden_size": 8})", "ffn_dim");
}

TEST(OptConfigTest, MalformedJsonAndMissingFile) {
  auto c = ModelConfig::FromJson("{\"model_type\": \"opt\",", "config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("malformed"), std::string::npos);
  EXPECT_EQ(ModelConfig::FromModelDir("/nonexistent-ferry").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ferry::engine
