#include "engine/sampling.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"
#include "test_util.h"

namespace ferry::engine {
namespace {

TEST(SamplingTest, GreedyIsArgMaxWithLowestIndexOnTies) {
  std::vector<float> l = {0.5f, 3.0f, -1.0f, 3.0f};
  Rng rng(1, 0);
  EXPECT_EQ(SampleToken(l.data(), 4, {}, rng), 1);
  EXPECT_EQ(ArgMax(l.data(), 4), 1);
}

TEST(SamplingTest, SameSeedSameStreamSameTokens) {
  std::vector<float> l = ferry::testing::RandomValues(1000, 3, 4.0f);
  SamplingOptions o{0.8f, 50, 0.9f, 1234};
  for (uint64_t stream : {0, 7}) {
    Rng a(o.seed, stream), b(o.seed, stream);
    for (int i = 0; i < 100; ++i) ASSERT_EQ(SampleToken(l.data(), 1000, o, a), SampleToken(l.data(), 1000, o, b));
  }
  Rng a(o.seed, 0), c(o.seed + 1, 0);
  int differ = 0;
  for (int i = 0; i < 100; ++i) differ += SampleToken(l.data(), 1000, o, a) != SampleToken(l.data(), 1000, o, c);
  EXPECT_GT(differ, 10);
}

TEST(SamplingTest, TopKOneAndTinyTopPAreGreedy) {
  std::vector<float> l = ferry::testing::RandomValues(300, 5, 4.0f);
  const int best = ArgMax(l.data(), 300);
  Rng rng(9, 0);
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(SampleToken(l.data(), 300, {1.0f, 1, 1.0f, 9}, rng), best);
    EXPECT_EQ(SampleToken(l.data(), 300, {1.0f, 0, 1e-6f, 9}, rng), best);
  }
}

TEST(SamplingTest, FrequenciesFollowTheSoftmax) {
  // Logits log(0.5), log(0.3), log(0.2): frequencies within 2% over 20000 draws.
  std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Rng rng(77, 0);
  std::map<int, int> count;
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) ++count[SampleToken(l.data(), 3, {1.0f, 0, 1.0f, 77}, rng)];
  EXPECT_NEAR(count[0] / double(draws), 0.5, 0.02);
  EXPECT_NEAR(count[1] / double(draws), 0.3, 0.02);
  EXPECT_NEAR(count[2] / double(draws), 0.2, 0.02);
  // top-p 0.6 keeps {0, 1}: token 2 never appears; 0 and 1 in ratio 5:3.
  count.clear();
  for (int i = 0; i < draws; ++i) ++count[SampleToken(l.data(), 3, {1.0f, 0, 0.6f, 77}, rng)];
  EXPECT_EQ(count[2], 0);
  EXPECT_NEAR(count[0] / double(draws), 0.625, 0.02);
  // top-k 1 of 3 after temperature 100 still picks the best.
  EXPECT_EQ(SampleToken(l.data(), 3, {100.0f, 1, 1.0f, 77}, rng), 0);
}

TEST(SamplingTest, BadOptionsAreRefused) {
  EXPECT_EQ(ValidateSampling({-1.0f, 0, 1.0f, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSampling({1.0f, -2, 1.0f, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSampling({1.0f, 0, 0.0f, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSampling({1.0f, 0, 1.5f, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateSampling({0.7f, 40, 0.95f, 3}).ok());
}

}  // namespace
}  // namespace ferry::engine
