// The Llama family's config.json reader: defaults per model_type, the rope scalings, and each
// unsupported or inconsistent field refused by name; checkpoints that contradict their config
// refused at load with a specific one-line error.
#include <filesystem>
#include <fstream>
#include <functional>

#include "base/file.h"
#include "engine/model.h"
#include "engine/rope.h"
#include "gtest/gtest.h"
#include "io/safetensors.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

using nlohmann::json;

json Base(const std::string& type = "llama") {
  return {{"model_type", type}, {"hidden_size", 64}, {"intermediate_size", 96}, {"num_hidden_layers", 2},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 100}, {"max_position_embeddings", 128}};
}

void ExpectRefused(const json& j, const std::string& field) {
  auto c = ModelConfig::FromJson(j.dump(), "config.json");
  ASSERT_FALSE(c.ok()) << j.dump();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find(field), std::string::npos) << c.status();
  EXPECT_EQ(std::string(c.status().message()).find('\n'), std::string::npos);
}

TEST(LlamaConfigTest, DefaultsPerModelType) {
  auto c = ModelConfig::FromJson(Base().dump(), "c");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, "llama");
  EXPECT_EQ(c->head_dim(), 16);
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->norm, NormKind::kRmsNorm);
  EXPECT_EQ(c->ffn, FfnKind::kSwiGlu);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->qkv_bias);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_ids, std::vector<int>{2});
  json q2 = Base("qwen2");
  auto qwen2 = ModelConfig::FromJson(q2.dump(), "c");
  ASSERT_TRUE(qwen2.ok());
  EXPECT_TRUE(qwen2->qkv_bias);
  EXPECT_FALSE(qwen2->o_bias);
  json q3 = Base("qwen3");
  auto qwen3 = ModelConfig::FromJson(q3.dump(), "c");
  ASSERT_TRUE(qwen3.ok());
  EXPECT_TRUE(qwen3->qk_norm);
  EXPECT_EQ(qwen3->head_dim(), 128);  // Qwen3Config's default, not hidden / heads
  // Llama 3's list of EOS ids.
  json l3 = Base();
  l3["eos_token_id"] = {2, 5, 9};
  auto llama3 = ModelConfig::FromJson(l3.dump(), "c");
  ASSERT_TRUE(llama3.ok());
  EXPECT_TRUE(llama3->is_eos(5) && llama3->is_eos(9) && !llama3->is_eos(3));
  // Mistral's default window of 4096 is shorter than this context: the context becomes the window.
  json m = Base("mistral");
  m["max_position_embeddings"] = 32768;
  auto mistral = ModelConfig::FromJson(m.dump(), "c");
  ASSERT_TRUE(mistral.ok());
  EXPECT_EQ(mistral->max_positions, 4096);
  m["sliding_window"] = nullptr;
  EXPECT_EQ(ModelConfig::FromJson(m.dump(), "c")->max_positions, 32768);
}

TEST(LlamaConfigTest, RefusesWhatItCannotRunNamingTheField) {
  json j = Base();
  j["rope_scaling"] = {{"rope_type", "longrope"}, {"factor", 2.0}};
  ExpectRefused(j, "rope_type");
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  ExpectRefused(j, "original_max_position_embeddings");  // required by llama3
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}, {"mystery", 1}};
  ExpectRefused(j, "rope_scaling.mystery");
  j = Base();
  j["num_key_value_heads"] = 3;
  ExpectRefused(j, "num_key_value_heads");
  j = Base();
  j["hidden_act"] = "gelu";
  ExpectRefused(j, "hidden_act");
  j = Base();
  j["partial_rotary_factor"] = 0.5;
  ExpectRefused(j, "partial_rotary_factor");
  j = Base("qwen2");
  j["use_sliding_window"] = true;
  ExpectRefused(j, "use_sliding_window");
  j = Base();
  j["some_new_feature"] = true;
  ExpectRefused(j, "some_new_feature");
  j = Base();
  j["num_attention_heads"] = 5;  // does not divide 64 and no head_dim
  j["num_key_value_heads"] = 5;
  ExpectRefused(j, "head_dim");
  j = Base();
  j["eos_token_id"] = 100;
  ExpectRefused(j, "eos_token_id");
  j = Base("qwen2");
  j["attention_bias"] = true;
  ExpectRefused(j, "attention_bias");
}

TEST(LlamaConfigTest, RopeFrequencies) {
  RopeConfig r;
  r.kind = RopeKind::kDefault;
  r.theta = 10000;
  r.rotary_dim = 8;
  const RopeFrequencies f = ComputeRopeFrequencies(r, 0);
  ASSERT_EQ(f.inv_freq.size(), 4u);
  EXPECT_FLOAT_EQ(f.inv_freq[0], 1.0f);
  EXPECT_NEAR(f.inv_freq[1], 0.1f, 1e-7);
  EXPECT_NEAR(f.inv_freq[3], 0.001f, 1e-9);
  r.kind = RopeKind::kLinear;
  r.factor = 4;
  EXPECT_FLOAT_EQ(ComputeRopeFrequencies(r, 0).inv_freq[1], f.inv_freq[1] / 4);
  // Dynamic NTK: the original frequencies up to the pretraining length, a larger base past it.
  r.kind = RopeKind::kDynamic;
  r.factor = 2;
  r.original_max_positions = 64;
  EXPECT_EQ(ComputeRopeFrequencies(r, 64).inv_freq, f.inv_freq);
  EXPECT_LT(ComputeRopeFrequencies(r, 100).inv_freq[1], f.inv_freq[1]);
  EXPECT_FLOAT_EQ(ComputeRopeFrequencies(r, 100).inv_freq[0], 1.0f);
}

// A golden checkpoint copied into a temporary directory with one change.
class BadCheckpointTest : public ::testing::Test {
 protected:
  std::string Copy(const std::string& golden) {
    const std::string src = ferry::testing::GoldensDir() + "/" + golden, dst = dir_.path() + "/" + golden;
    std::filesystem::copy(src, dst, std::filesystem::copy_options::recursive);
    return dst;
  }
  static void EditConfig(const std::string& dir, const std::function<void(json&)>& edit) {
    auto text = ReadFileToString(dir + "/config.json");
    json j = json::parse(*text);
    edit(j);
    ferry::testing::WriteFile(dir + "/config.json", j.dump());
  }
  static absl::Status LoadStatus(const std::string& dir) {
    kernels::CpuBackend cpu;
    return Model::Load(dir, &cpu).status();
  }
  ferry::testing::TempDir dir_;
};

TEST_F(BadCheckpointTest, MissingQNormInAQwen3Checkpoint) {
  const std::string dir = Copy("qwen3-yarn");
  auto st = io::SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(st.ok());
  std::vector<ferry::testing::StTensor> kept;
  for (const auto& [name, info] : (*st)->tensors()) {
    if (name == "model.layers.1.self_attn.q_norm.weight") continue;
    std::string bytes(info.bytes, '\0');
    ASSERT_TRUE((*st)->Read(info, bytes.data(), bytes.size()).ok());
    kept.push_back({name, info.dtype, info.shape, bytes});
  }
  st->reset();
  ferry::testing::WriteFile(dir + "/model.safetensors", ferry::testing::SerializeSafetensors(kept));
  const absl::Status s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("model.layers.1.self_attn.q_norm.weight"), std::string::npos) << s;
}

TEST_F(BadCheckpointTest, ConfigThatContradictsTheTensors) {
  const std::string dir = Copy("llama-gqa");
  EditConfig(dir, [](json& j) { j["num_key_value_heads"] = 4; });  // the k/v projections are [32, 64]
  absl::Status s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("has shape [32, 64] but config.json implies [64, 64]"), std::string::npos) << s;
  EditConfig(dir, [](json& j) { j["num_key_value_heads"] = 2, j["num_hidden_layers"] = 1; });  // a layer left over
  s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("num_hidden_layers = 1"), std::string::npos) << s;
  EditConfig(dir, [](json& j) { j["num_hidden_layers"] = 2, j["rope_scaling"] = {{"rope_type", "su"}, {"factor", 2.0}}; });
  s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("rope_scaling.rope_type"), std::string::npos) << s;
  EditConfig(dir, [](json& j) { j.erase("rope_scaling"), j["tie_word_embeddings"] = true; });
  EXPECT_TRUE(LoadStatus(dir).ok());  // tied: lm_head.weight is present but unused
}

}  // namespace
}  // namespace ferry::engine
