// The CPU backend against transformers' float32 goldens on tiny-opt: last-position logits of every
// prompt, all-position logits of the first, and the 32 greedy tokens, exactly.
#include <algorithm>
#include <cmath>
#include <fstream>

#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "model_util.h"
#include "test_util.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

nlohmann::json Goldens() {
  std::ifstream in(ferry::testing::DataDir() + "/goldens.json");
  return nlohmann::json::parse(in);
}

// max |ours - ref| / max |ref|
double RelErr(const float* ours, const std::vector<float>& ref) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(ours[i]) - ref[i]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(ref[i])));
  }
  return max_diff / max_ref;
}

class GoldenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(ferry::testing::ModelDir(), &backend_);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    goldens_ = Goldens();
  }
  kernels::CpuBackend backend_;
  std::unique_ptr<Model> model_;
  nlohmann::json goldens_;
};

TEST_F(GoldenTest, LastLogitsAndAllPositionLogits) {
  const int vocab = model_->config().vocab_size;
  bool checked_all_positions = false;
  for (const auto& p : goldens_["prompts"]) {
    const std::vector<int> ids = p["ids"];
    auto all_logits = ferry::testing::AllLogits(*model_, backend_, ids);
    ASSERT_TRUE(all_logits.ok()) << all_logits.status();
    const std::vector<float>& logits = *all_logits;
    const std::vector<float> last = p["last_logits"];
    ASSERT_EQ(last.size(), static_cast<size_t>(vocab));
    const double err = RelErr(logits.data() + (ids.size() - 1) * vocab, last);
    EXPECT_LT(err, 1e-4) << p["text"];
    if (p["logits_all_positions"].is_array()) {
      const auto& all = p["logits_all_positions"];
      ASSERT_EQ(all.size(), ids.size());
      for (size_t i = 0; i < ids.size(); ++i) {
        const std::vector<float> ref = all[i];
        EXPECT_LT(RelErr(logits.data() + i * vocab, ref), 1e-4) << "position " << i;
      }
      checked_all_positions = true;
    }
  }
  EXPECT_TRUE(checked_all_positions);
}

TEST_F(GoldenTest, GreedyTokensExact) {
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  ASSERT_TRUE(tok.ok());
  for (const auto& p : goldens_["prompts"]) {
    const std::vector<int> ids = p["ids"];
    auto encoded = (*tok)->Encode(p["text"].get<std::string>());
    ASSERT_TRUE(encoded.ok());
    EXPECT_EQ(*encoded, ids);
    GenerateOptions o;
    o.max_new_tokens = 32;
    o.min_new_tokens = 32;  // as the goldens were made (transformers' min_new_tokens)
    auto r = Generate(*model_, {{ids, 0}}, o);
    ASSERT_TRUE(r.ok()) << r.status();
    const std::vector<int> greedy = p["greedy_ids"];
    EXPECT_EQ((*r)[0].tokens, greedy) << p["text"];
    auto text = (*tok)->Decode((*r)[0].tokens);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(*text, p["greedy_text"].get<std::string>());
  }
}

}  // namespace
}  // namespace ferry::engine
