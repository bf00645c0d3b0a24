// tiny-opt end to end on the GPU: the same greedy tokens as the CPU for every golden prompt,
// last-position logits close to the goldens (fp16 GEMM inputs), WikiText-2 perplexity within
// 0.5% of the CPU's. Skips (GTEST_SKIP) where no GPU is visible.
#include <algorithm>
#include <cmath>
#include <fstream>

#include "base/file.h"
#include "engine/generator.h"
#include "engine/perplexity.h"
#include "engine/sparsity.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "kernels/registry.h"
#include "offload/h2o_cache.h"
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
    auto m = Model::Load(ferry::testing::ModelDir(), gpu_.get());
    ASSERT_TRUE(m.ok()) << m.status();
    gpu_model_ = std::move(*m);
    cpu_model_ = std::move(*Model::Load(ferry::testing::ModelDir(), cpu_.get()));
  }
  std::unique_ptr<kernels::Backend> gpu_, cpu_;
  std::unique_ptr<Model> gpu_model_, cpu_model_;
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

    auto cache = offload::CreateKvCache(*gpu_, KvSpec(gpu_model_->config(), 1, static_cast<int>(ids.size())));
    ForwardBatch b;
    for (size_t i = 0; i < ids.size(); ++i) b.tokens.push_back(ids[i]), b.seq_ids.push_back(0), b.positions.push_back(i);
    b.logit_rows.push_back(static_cast<int32_t>(ids.size()) - 1);
    std::vector<float> logits;
    ASSERT_TRUE(gpu_model_->Forward(b, **cache, &logits).ok());
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
  // F16 keys and values on the GPU: within 0.5% of the CPU's F16 cache and 0.1% of the GPU's F32.
  o.kv_dtype = DType::kF16;
  auto gpu16 = ComputePerplexity(*gpu_model_, *ids, o);
  auto cpu16 = ComputePerplexity(*cpu_model_, *ids, o);
  ASSERT_TRUE(gpu16.ok() && cpu16.ok()) << gpu16.status();
  EXPECT_NEAR(gpu16->perplexity, cpu16->perplexity, cpu16->perplexity * 0.005);
  EXPECT_NEAR(gpu16->perplexity, gpu->perplexity, gpu->perplexity * 0.001);
}

// H2O on the GPU: token-by-token perplexity through the slot kernels equals the CPU's within 0.5%,
// and a prefill through the tensor-core column sums keeps nearly the same tokens and gives close
// logits for two prompts of different lengths.
TEST_F(CudaModelTest, H2OMatchesTheCpu) {
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto raw = ReadFileToString(ferry::testing::DataDir() + "/kjv-val.txt");
  auto ids = (*tok)->Encode(*raw);
  ASSERT_TRUE(ids.ok());
  PerplexityOptions o;
  o.max_tokens = 1024;
  o.h2o = offload::H2OOptions{51, 51, 0};
  auto gpu = ComputePerplexity(*gpu_model_, *ids, o);
  auto cpu = ComputePerplexity(*cpu_model_, *ids, o);
  ASSERT_TRUE(gpu.ok() && cpu.ok()) << gpu.status() << cpu.status();
  EXPECT_NEAR(gpu->perplexity, cpu->perplexity, cpu->perplexity * 0.005);
  o.kv_dtype = DType::kF16;  // F16 slots
  auto gpu16 = ComputePerplexity(*gpu_model_, *ids, o);
  auto cpu16 = ComputePerplexity(*cpu_model_, *ids, o);
  ASSERT_TRUE(gpu16.ok() && cpu16.ok()) << gpu16.status() << cpu16.status();
  EXPECT_NEAR(gpu16->perplexity, cpu16->perplexity, cpu16->perplexity * 0.005);
  o.kv_dtype = DType::kF32;

  const ModelConfig& c = cpu_model_->config();
  const offload::H2OOptions h{24, 24, 2};
  auto gcache = offload::H2OCache::Create(*gpu_, c.num_layers, c.num_heads, c.head_dim(), 2, h);
  auto ccache = offload::H2OCache::Create(*cpu_, c.num_layers, c.num_heads, c.head_dim(), 2, h);
  ASSERT_TRUE(gcache.ok() && ccache.ok());
  ForwardBatch b;
  const int len[2] = {200, 90};
  for (int s = 0; s < 2; ++s) {
    for (int t = 0; t < len[s]; ++t) b.tokens.push_back((*ids)[s * 500 + t]), b.seq_ids.push_back(s), b.positions.push_back(t);
    b.logit_rows.push_back(static_cast<int32_t>(b.tokens.size()) - 1);
  }
  std::vector<float> gl, cl;
  ASSERT_TRUE(gpu_model_->Forward(b, **gcache, &gl).ok());
  ASSERT_TRUE(cpu_model_->Forward(b, **ccache, &cl).ok());
  double diff = 0, mag = 0;
  for (size_t i = 0; i < cl.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(gl[i]) - cl[i]));
    mag = std::max(mag, std::abs(static_cast<double>(cl[i])));
  }
  EXPECT_LT(diff / mag, 1e-2);
  int same = 0, total = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int s = 0; s < 2; ++s) {
      for (int hd = 0; hd < c.num_heads; ++hd) {
        const std::vector<int> g = (*gcache)->Held(l, s, hd), r = (*ccache)->Held(l, s, hd);
        for (int p : r) {
          if (p < 0) continue;
          ++total;
          same += std::find(g.begin(), g.end(), p) != g.end();
        }
      }
    }
  }
  EXPECT_GE(same, total * 0.97) << same << " of " << total << " kept positions agree";
  // Then decode steps through the slots on both.
  for (int t = 0; t < 8; ++t) {
    ForwardBatch d{{(*ids)[200 + t], (*ids)[590 + t]}, {0, 1}, {len[0] + t, len[1] + t}, {0, 1}};
    ASSERT_TRUE(gpu_model_->Forward(d, **gcache, &gl).ok());
    ASSERT_TRUE(cpu_model_->Forward(d, **ccache, &cl).ok());
  }
  diff = 0, mag = 0;
  for (size_t i = 0; i < cl.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(gl[i]) - cl[i]));
    mag = std::max(mag, std::abs(static_cast<double>(cl[i])));
  }
  EXPECT_LT(diff / mag, 2e-2);
}

// Deja Vu on the GPU: predictors trained with the same steps as on the CPU (fp32 SGEMMs, the same
// BCE and Adam rules, the same batches), so after two epochs each layer's held-out recall is
// within 0.01 of the CPU-trained one; activations collected from the GPU model; the sparsity hook
// on the GPU model.
TEST_F(CudaModelTest, PredictorsTrainOnTheGpuAsOnTheCpu) {
  ferry::testing::TempDir dir;
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto raw = ReadFileToString(ferry::testing::DataDir() + "/kjv-train-400k.txt");
  auto ids = (*tok)->Encode(NormalizeNewlines(*raw));
  ASSERT_TRUE(ids.ok());
  CollectOptions co;
  co.tokens = 12000;
  ASSERT_TRUE(CollectActivations(*cpu_model_, *ids, dir.File("data"), co).ok());
  TrainOptions to;
  to.epochs = 2;
  to.backend = cpu_.get();
  auto on_cpu = TrainPredictors(dir.File("data"), dir.File("cpu"), to);
  to.backend = gpu_.get();
  auto on_gpu = TrainPredictors(dir.File("data"), dir.File("gpu"), to);
  ASSERT_TRUE(on_cpu.ok() && on_gpu.ok()) << on_gpu.status();
  ASSERT_EQ(on_cpu->size(), on_gpu->size());
  int predicted = 0;
  for (size_t l = 0; l < on_cpu->size(); ++l) {
    EXPECT_EQ((*on_cpu)[l].dense, (*on_gpu)[l].dense);
    if ((*on_cpu)[l].dense) continue;
    ++predicted;
    EXPECT_NEAR((*on_gpu)[l].recall_at_k, (*on_cpu)[l].recall_at_k, 0.01) << "layer " << l;
    EXPECT_GT((*on_gpu)[l].recall_at_k, 0.4) << "layer " << l;
  }
  EXPECT_EQ(predicted, 5);

  // Collected on the GPU: the same active fractions (FC1 outputs near zero may flip sign).
  ASSERT_TRUE(CollectActivations(*gpu_model_, *ids, dir.File("gpu-data"), co).ok());
  auto meta_cpu = nlohmann::json::parse(*ReadFileToString(dir.File("data") + "/meta.json"));
  auto meta_gpu = nlohmann::json::parse(*ReadFileToString(dir.File("gpu-data") + "/meta.json"));
  for (size_t l = 0; l < meta_cpu["active_fraction"].size(); ++l) {
    EXPECT_NEAR(meta_gpu["active_fraction"][l].get<double>(), meta_cpu["active_fraction"][l].get<double>(), 2e-3) << "layer " << l;
  }
  // The sparsity hook on the resident GPU model (activations through the host): perplexity with
  // 15% of the neurons within 0.5% of the CPU's.
  auto pred = SparseFfn::Load(dir.File("cpu"), cpu_model_->config());
  ASSERT_TRUE(pred.ok()) << pred.status();
  auto val = (*tok)->Encode(NormalizeNewlines(*ReadFileToString(ferry::testing::DataDir() + "/kjv-val.txt")));
  PerplexityOptions po;
  po.max_tokens = 1024;
  auto gpu_hook = pred->Hook(gpu_.get()), cpu_hook = pred->Hook(cpu_.get());
  po.ffn_hook = &gpu_hook;
  auto gpu_ppl = ComputePerplexity(*gpu_model_, *val, po);
  po.ffn_hook = &cpu_hook;
  auto cpu_ppl = ComputePerplexity(*cpu_model_, *val, po);
  ASSERT_TRUE(gpu_ppl.ok() && cpu_ppl.ok()) << gpu_ppl.status();
  EXPECT_NEAR(gpu_ppl->perplexity, cpu_ppl->perplexity, cpu_ppl->perplexity * 0.005);
}

// Every model-family golden on the GPU: the 16 greedy tokens transformers gave (as on the CPU),
// the whole batch at once, and with a GQA H2O cache that holds everything.
TEST_F(CudaModelTest, FamilyGoldensGiveTheirGreedyTokens) {
  for (const char* name : {"llama-gqa", "llama3-tied", "llama-bias", "smollm2-style", "mistral", "qwen2-dynamic", "qwen3-yarn"}) {
    const std::string dir = ferry::testing::GoldensDir() + "/" + name;
    auto m = Model::Load(dir, gpu_.get());
    ASSERT_TRUE(m.ok()) << m.status();
    std::ifstream in(dir + "/goldens.json");
    const auto g = nlohmann::json::parse(in);
    std::vector<GenerationRequest> reqs;
    for (const auto& p : g["prompts"]) reqs.push_back({p["ids"].get<std::vector<int>>(), reqs.size()});
    GenerateOptions o;
    o.max_new_tokens = o.min_new_tokens = 16;
    for (bool h2o : {false, true}) {
      if (h2o) o.h2o = offload::H2OOptions{128, 128, 0};
      auto r = Generate(**m, reqs, o);
      ASSERT_TRUE(r.ok()) << r.status();
      for (size_t i = 0; i < reqs.size(); ++i) {
        EXPECT_EQ((*r)[i].tokens, g["prompts"][i]["greedy"].get<std::vector<int>>()) << name << " prompt " << i << " h2o " << h2o;
      }
    }
  }
}

}  // namespace
}  // namespace ferry::engine
