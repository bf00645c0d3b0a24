// Generation on tiny-opt: batch invariance (greedy and sampled), EOS and length stops, and the
// context limit.
#include "engine/generator.h"

#include <algorithm>
#include <functional>

#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::engine {
namespace {

class GenerateTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    backend_ = new kernels::CpuBackend();
    model_ = std::move(*Model::Load(ferry::testing::ModelDir(), backend_)).release();
    tok_ = std::move(*Tokenizer::FromModelDir(ferry::testing::ModelDir())).release();
  }
  std::vector<int> Ids(const std::string& text) { return *tok_->Encode(text); }
  static kernels::CpuBackend* backend_;
  static Model* model_;
  static Tokenizer* tok_;
};
kernels::CpuBackend* GenerateTest::backend_;
Model* GenerateTest::model_;
Tokenizer* GenerateTest::tok_;

const std::vector<std::string> kPrompts = {
    "In the beginning God created", "ROMEO:\nWhat light",
    "And it came to pass, when the king of Israel heard these words, that he rent his clothes",
    "To be", "Blessed are the meek: for they shall inherit the earth. Blessed are they which do hunger"};

TEST_F(GenerateTest, BatchInvariance) {
  for (float temperature : {0.0f, 0.9f}) {
    GenerateOptions o;
    o.max_new_tokens = 20;
    o.sampling = {temperature, 40, 0.95f, 31};
    std::vector<GenerationRequest> batch;
    for (size_t i = 0; i < kPrompts.size(); ++i) batch.push_back({Ids(kPrompts[i]), i});
    auto together = Generate(*model_, batch, o);
    ASSERT_TRUE(together.ok()) << together.status();
    // Reverse order, and prefill split into several calls.
    std::vector<GenerationRequest> reversed(batch.rbegin(), batch.rend());
    o.max_prefill_tokens = 20;
    auto rev = Generate(*model_, reversed, o);
    ASSERT_TRUE(rev.ok());
    for (size_t i = 0; i < batch.size(); ++i) {
      auto alone = Generate(*model_, {batch[i]}, o);
      ASSERT_TRUE(alone.ok());
      EXPECT_EQ((*alone)[0].tokens, (*together)[i].tokens) << kPrompts[i] << " T=" << temperature;
      EXPECT_EQ((*rev)[batch.size() - 1 - i].tokens, (*together)[i].tokens) << kPrompts[i];
      EXPECT_EQ((*alone)[0].finish_reason, (*together)[i].finish_reason);
    }
  }
}

// The FFN hook (Deja Vu on a resident model, `generate --sparsity`) reaches every forward pass:
// one that keeps every neuron changes nothing, one that drops them all changes the text.
TEST_F(GenerateTest, FfnHookReachesEveryStep) {
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.min_new_tokens = 12;
  int calls = 0;
  const std::function<absl::Status(int, const TensorView&, const TensorView&)> keep_all =
      [&](int, const TensorView&, const TensorView&) { ++calls; return absl::OkStatus(); };
  const std::function<absl::Status(int, const TensorView&, const TensorView&)> drop_all =
      [](int, const TensorView&, const TensorView& act) {
        std::fill(act.as<float>(), act.as<float>() + act.numel(), 0.0f);
        return absl::OkStatus();
      };
  auto plain = Generate(*model_, {{Ids("And God said"), 0}}, o);
  o.ffn_hook = &keep_all;
  auto kept = Generate(*model_, {{Ids("And God said"), 0}}, o);
  o.ffn_hook = &drop_all;
  auto dropped = Generate(*model_, {{Ids("And God said"), 0}}, o);
  ASSERT_TRUE(plain.ok() && kept.ok() && dropped.ok());
  EXPECT_EQ((*kept)[0].tokens, (*plain)[0].tokens);
  EXPECT_EQ(calls, 12 * model_->config().num_layers);  // one prefill and 11 decode passes
  EXPECT_NE((*dropped)[0].tokens, (*plain)[0].tokens);
}

TEST_F(GenerateTest, SeedDecidesTheText) {
  GenerateOptions o;
  o.max_new_tokens = 16;
  o.sampling = {1.0f, 0, 1.0f, 5};
  auto a = Generate(*model_, {{Ids("To be"), 0}}, o);
  auto b = Generate(*model_, {{Ids("To be"), 0}}, o);
  o.sampling.seed = 6;
  auto c = Generate(*model_, {{Ids("To be"), 0}}, o);
  EXPECT_EQ((*a)[0].tokens, (*b)[0].tokens);
  EXPECT_NE((*a)[0].tokens, (*c)[0].tokens);
}

TEST_F(GenerateTest, StopsAtEosOrLength) {
  GenerateOptions o;
  o.max_new_tokens = 32;
  // Greedy on this prompt emits </s> as its 5th token (the goldens suppress it with min_new_tokens).
  auto r = Generate(*model_, {{Ids("ROMEO:\nWhat light"), 0}}, o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].finish_reason, "eos");
  EXPECT_EQ((*r)[0].tokens.back(), model_->config().eos_token_id());
  EXPECT_EQ((*r)[0].tokens.size(), 5u);
  o.max_new_tokens = 3;
  r = Generate(*model_, {{Ids("In the beginning God created"), 0}}, o);
  EXPECT_EQ((*r)[0].finish_reason, "length");
  EXPECT_EQ((*r)[0].tokens.size(), 3u);
}

TEST_F(GenerateTest, ContextLimit) {
  const int ctx = model_->config().max_positions;
  std::vector<int> too_long(ctx + 1, 262);
  too_long[0] = 2;
  GenerateOptions o;
  auto r = Generate(*model_, {{too_long, 0}}, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("context"), std::string::npos) << r.status();
  // A prompt that fills the context gets one token, then stops for length.
  std::vector<int> full(ctx, 262);
  full[0] = 2;
  o.stop_at_eos = false;
  r = Generate(*model_, {{full, 0}}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].tokens.size(), 1u);
  EXPECT_EQ((*r)[0].finish_reason, "length");
  // Near the end: generation stops at the context, not at max_new_tokens.
  std::vector<int> near(ctx - 3, 262);
  near[0] = 2;
  r = Generate(*model_, {{near, 0}}, o);
  EXPECT_EQ((*r)[0].tokens.size(), 4u);
}

TEST_F(GenerateTest, BadRequests) {
  GenerateOptions o;
  EXPECT_EQ(Generate(*model_, {{{}, 0}}, o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Generate(*model_, {{{2, 999999}, 0}}, o).status().code(), absl::StatusCode::kInvalidArgument);
  o.max_new_tokens = -1;
  EXPECT_EQ(Generate(*model_, {{{2, 5}, 0}}, o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::engine
