// tiny-opt end to end on the GPU: the same greedy tokens as the CPU for every golden prompt,
// last-position logits close to the goldens (fp16 GEMM inputs), WikiText-2 perplexity within
// 0.5% of the CPU's. Skips (GTEST_SKIP) where no GPU is visible.
#include <cmath>
#include <fstream>

#include "base/file.h"
#include "engine/generator.h"
#include "engine/perplexity.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "kernels/registry.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

class CudaModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kernels::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    auto gpu = kernels::CreateBackend({"cuda", 0, 0});
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = std::move(*gpu);
    cpu_ = std::move(*kernels::CreateBackend({"cpu", 0, 0}));
    auto m = OptModel::Load(ferry::testing::ModelDir(), gpu_.get());
    ASSERT_TRUE(m.ok()) << m.status();
    gpu_model_ = std::move(*m);
    cpu_model_ = std::move(*OptModel::Load(ferry::testing::ModelDir(), cpu_.get()));
  }
  std::unique_ptr<kernels::Backend> gpu_, cpu_;
  std::unique_ptr<OptModel> gpu_model_, cpu_model_;
};

TEST_F(CudaModelTest, GreedyTokensMatchTheCpuAndLogitsTheGoldens) {
  std::ifstream in(ferry::testing::DataDir() + "/goldens.json");
  const auto g = nlohmann::json::parse(in);
  for (const auto& p : g["prompts"]) {
    const std::vector<int> ids = p["ids"];
    GenerateOptions o;
    o.max_new_tokens = 32;
    o.min_new_tokens = 32;
    auto gpu = Generate(*gpu_model_, {{ids, 0}}, o);
    auto cpu = Generate(*cpu_model_, {{ids, 0}}, o);
    ASSERT_TRUE(gpu.ok() && cpu.ok()) << gpu.status();
    EXPECT_EQ((*gpu)[0].tokens, (*cpu)[0].tokens) << p["text"];
    EXPECT_EQ((*gpu)[0].tokens, p["greedy_ids"].get<std::vector<int>>()) << p["text"];

    auto cache = KvCache::Create(*gpu_, gpu_model_->config(), 1, static_cast<int>(ids.size()));
    ForwardBatch b;
    for (size_t i = 0; i < ids.size(); ++i) b.tokens.push_back(ids[i]), b.seq_ids.push_back(0), b.positions.push_back(i);
    b.logit_rows.push_back(static_cast<int32_t>(ids.size()) - 1);
    std::vector<float> logits;
    ASSERT_TRUE(gpu_model_->Forward(b, *cache, &logits).ok());
    const std::vector<float> ref = p["last_logits"];
    double diff = 0, mag = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      diff = std::max(diff, std::abs(static_cast<double>(logits[i]) - ref[i]));
      mag = std::max(mag, std::abs(static_cast<double>(ref[i])));
    }
    EXPECT_LT(diff / mag, 5e-3) << p["text"];
  }
}

TEST_F(CudaModelTest, PerplexityWithinHalfAPercentOfTheCpu) {
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto raw = ReadFileToString(ferry::testing::DataDir() + "/wiki.test.raw");
  auto ids = (*tok)->Encode(NormalizeNewlines(*raw));
  PerplexityOptions o;
  o.max_tokens = 16384;
  auto gpu = ComputePerplexity(*gpu_model_, *ids, o);
  auto cpu = ComputePerplexity(*cpu_model_, *ids, o);
  ASSERT_TRUE(gpu.ok() && cpu.ok()) << gpu.status();
  EXPECT_NEAR(gpu->perplexity, cpu->perplexity, cpu->perplexity * 0.005);
}

}  // namespace
}  // namespace ferry::engine
