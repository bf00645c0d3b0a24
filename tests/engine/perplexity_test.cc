// Perplexity in the goldens' convention: WikiText-2 test, first 16384 tokens, windows of 512.
#include "engine/perplexity.h"

#include "base/file.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::engine {
namespace {

TEST(PerplexityTest, WikiText2MatchesTransformers) {
  kernels::CpuBackend cpu;
  auto model = Model::Load(ferry::testing::ModelDir(), &cpu);
  ASSERT_TRUE(model.ok());
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto raw = ReadFileToString(ferry::testing::DataDir() + "/wiki.test.raw");
  ASSERT_TRUE(raw.ok());
  auto ids = (*tok)->Encode(NormalizeNewlines(*raw));
  ASSERT_TRUE(ids.ok());
  PerplexityOptions o;
  o.window = 512;
  o.max_tokens = 16384;
  auto r = ComputePerplexity(**model, *ids, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->scored_tokens, 32 * 511);
  EXPECT_NEAR(r->perplexity, 6914.08, 6914.08 * 0.001);
}

// Issue 15's quality bounds for quantized weights: tiny-opt on kjv-val (4096 tokens, windows of
// 512), q4 group 64 within +1% of the unquantized perplexity (a reference min/max g64 quantization
// measured +0.6%), q8 within +0.1%.
TEST(PerplexityTest, QuantizedWeightsStayWithinTheirBounds) {
  kernels::CpuBackend cpu;
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto raw = ReadFileToString(ferry::testing::DataDir() + "/kjv-val.txt");
  ASSERT_TRUE(raw.ok());
  auto ids = (*tok)->Encode(NormalizeNewlines(*raw));
  ASSERT_TRUE(ids.ok());
  PerplexityOptions o;
  o.window = 512;
  o.max_tokens = 4096;
  const auto ppl = [&](std::optional<QuantFormat> q) {
    GgufLoadOptions lo;
    lo.quantize = q;
    auto model = Model::Load(ferry::testing::ModelDir(), &cpu, lo);
    EXPECT_TRUE(model.ok()) << model.status();
    auto r = ComputePerplexity(**model, *ids, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r->perplexity;
  };
  const double base = ppl(std::nullopt), q4 = ppl(QuantFormat{QuantKind::kQ4, 64}), q8 = ppl(QuantFormat{QuantKind::kQ8, 64});
  EXPECT_NEAR(base, 45.87, 0.05);
  EXPECT_LE(q4, base * 1.01) << "q4g64 " << q4 << " vs " << base;
  EXPECT_GT(q4, base * 1.0005);  // the quantization is really there
  EXPECT_LE(q8, base * 1.001) << "q8g64 " << q8 << " vs " << base;
  // Columns that are not whole groups are refused at load, naming the tensor.
  GgufLoadOptions bad;
  bad.quantize = QuantFormat{QuantKind::kQ4, 96};
  auto refused = Model::Load(ferry::testing::ModelDir(), &cpu, bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(refused.status().message()).find("groups of 96"), std::string::npos) << refused.status();
}

TEST(PerplexityTest, BatchingWindowsChangesNothingAndBadOptionsAreRefused) {
  kernels::CpuBackend cpu;
  auto model = Model::Load(ferry::testing::ModelDir(), &cpu);
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto ids = (*tok)->Encode("Thou shalt not kill. Thou shalt not steal. Honour thy father and thy mother, "
                            "that thy days may be long upon the land which the LORD thy God giveth thee.");
  PerplexityOptions o;
  o.window = 7;
  o.tokens_per_call = 7;
  auto one = ComputePerplexity(**model, *ids, o);
  o.tokens_per_call = 100;
  auto many = ComputePerplexity(**model, *ids, o);
  ASSERT_TRUE(one.ok() && many.ok());
  EXPECT_EQ(one->nll_sum, many->nll_sum);  // bitwise: the kernels are batch invariant
  o.window = 513;
  EXPECT_EQ(ComputePerplexity(**model, *ids, o).status().code(), absl::StatusCode::kInvalidArgument);
  o.window = 512;
  EXPECT_EQ(ComputePerplexity(**model, {2}, o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PerplexityTest, NewlinesAreReadAsPythonTextModeReadsThem) {
  EXPECT_EQ(NormalizeNewlines("a\r\nb\rc\n\r\n"), "a\nb\nc\n\n");
}

}  // namespace
}  // namespace ferry::engine
