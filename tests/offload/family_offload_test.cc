// Llama-family checkpoints through the offloading executor: converted stores keep each tensor's
// role; logits are bitwise the resident model's at every placement (100/0/0, 0/100/0, 0/0/100,
// mixed), with micro-batches, and with the KV cache on the CPU (dense and H2O); the plan counts
// the GQA cache from the same spec that allocates it; Deja Vu on a SwiGLU model is refused.
#include <fstream>

#include "engine/dummy_model.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "io/store.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

std::vector<float> RunSteps(Model& m, kernels::Backend& b, offload::AttentionCache& cache, bool micro) {
  std::vector<float> all, logits;
  // Two prompts prefilled in one call, then 6 decode steps of both.
  ForwardBatch pre{{2, 811, 4000, 17, 2, 77, 5000}, {0, 0, 0, 0, 1, 1, 1}, {0, 1, 2, 3, 0, 1, 2}, {0, 1, 2, 3, 4, 5, 6}};
  if (micro) pre.micro_batch_ends = {4, 7};
  EXPECT_TRUE(m.Forward(pre, cache, &logits).ok());
  all = logits;
  for (int t = 0; t < 6; ++t) {
    ForwardBatch dec{{100 + t, 200 + t}, {0, 1}, {4 + t, 3 + t}, {0, 1}};
    if (micro) dec.micro_batch_ends = {1, 2};
    const absl::Status s = m.Forward(dec, cache, &logits);
    EXPECT_TRUE(s.ok()) << s;
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

std::vector<float> RunDense(Model& m, kernels::Backend& b, bool micro = false) {
  auto cache = offload::CreateKvCache(b, KvSpec(m.config(), 2, 16));
  EXPECT_TRUE(cache.ok());
  return RunSteps(m, b, **cache, micro);
}

class FamilyOffloadTest : public ::testing::TestWithParam<const char*> {
 protected:
  std::string Golden() const { return ferry::testing::GoldensDir() + "/" + GetParam(); }
};

TEST_P(FamilyOffloadTest, EveryPlacementGivesTheResidentLogits) {
  kernels::CpuBackend resident_backend;
  auto resident = Model::Load(Golden(), &resident_backend);
  ASSERT_TRUE(resident.ok()) << resident.status();
  const std::vector<float> expected = RunDense(**resident, resident_backend);
  ferry::testing::TempDir store;
  ASSERT_TRUE(ConvertModel(Golden(), store.path() + "/s").ok());
  const std::string dir = store.path() + "/s";
  // The manifest records roles.
  {
    auto s = io::Store::Open(dir);
    ASSERT_TRUE(s.ok());
    const io::StoreTensor* q = s->FindTensor("model.layers.1.self_attn.q_proj.weight");
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->role, "attn_q");
    EXPECT_EQ(s->FindTensor("model.embed_tokens.weight")->role, "tok_embed");
  }
  // The store is a model directory of its own.
  {
    kernels::CpuBackend b;
    auto m = Model::Load(dir, &b);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(RunDense(**m, b), expected);
  }
  for (const offload::WeightSplit split : {offload::WeightSplit{100, 0, 0}, offload::WeightSplit{0, 100, 0},
                                           offload::WeightSplit{0, 0, 100}, offload::WeightSplit{30, 30, 40}}) {
    for (bool micro : {false, true}) {
      kernels::CpuBackend backend;
      OffloadOptions o;
      o.split = split;
      o.streamer.uring.block_bytes = 64 << 10;
      auto m = Model::LoadOffloaded(dir, &backend, o);
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_EQ(RunDense(**m, backend, micro), expected) << split.gpu << "," << split.cpu << "," << split.disk << " micro " << micro;
    }
  }
  // The KV cache in pinned host memory with the attention on the CPU, sized by the same spec.
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = {0, 100, 0};
  auto m = Model::LoadOffloaded(dir, &backend, o);
  ASSERT_TRUE(m.ok());
  offload::KvCacheSpec spec = KvSpec((*m)->config(), 2, 16);
  spec.on_host = true;
  const size_t before = backend.host_allocated_bytes();
  auto host = offload::CreateKvCache(backend, spec);
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(backend.host_allocated_bytes() - before, offload::KvCacheBytes(spec).host);
  EXPECT_EQ(offload::KvCacheBytes(spec).host, 2ull * (*m)->config().num_layers * 2 * 16 * (*m)->config().kv_width() * 4);
  EXPECT_EQ(RunSteps(**m, backend, **host, true), expected);
  // H2O with room for everything: the dense cache's logits; on the device and on the host.
  for (bool on_host : {false, true}) {
    offload::KvCacheSpec h = KvSpec((*m)->config(), 2, 16);
    h.h2o = offload::H2OOptions{16, 16, 0};
    h.on_host = on_host;
    auto cache = offload::CreateKvCache(backend, h);
    ASSERT_TRUE(cache.ok()) << cache.status();
    const std::vector<float> got = RunSteps(**m, backend, **cache, false);
    ASSERT_EQ(got.size(), expected.size());
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(got[i]) - expected[i]));
    EXPECT_LT(worst, 1e-4) << (on_host ? "host" : "device");
  }
}

TEST_P(FamilyOffloadTest, DejaVuOnSwiGluIsRefused) {
  ferry::testing::TempDir store;
  ASSERT_TRUE(ConvertModel(Golden(), store.path() + "/s").ok());
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = {0, 100, 0};
  o.sparse_ffn = true;
  auto m = Model::LoadOffloaded(store.path() + "/s", &backend, o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("SwiGLU"), std::string::npos) << m.status();
}

INSTANTIATE_TEST_SUITE_P(Goldens, FamilyOffloadTest, ::testing::Values("llama-gqa", "qwen3-yarn", "qwen2-dynamic"),
                         [](const auto& info) { return ferry::testing::ParamName(info.param); });

}  // namespace
}  // namespace ferry::engine

namespace ferry::engine {
namespace {

// The dummies have the real models' parameter counts, and a GQA cache is kv_heads / heads of the
// multi-head one: what --fit-batch counts.
TEST(FamilyDummyTest, RealShapesAndGqaCacheBytes) {
  const std::pair<const char*, double> params[] = {{"llama-2-7b", 6.738e9}, {"llama-2-13b", 13.016e9}, {"llama-2-70b", 68.977e9},
                                                   {"llama-3-8b", 8.030e9}, {"llama-3-70b", 70.554e9}, {"qwen2.5-7b", 7.616e9},
                                                   {"qwen2.5-32b", 32.764e9}, {"mistral-7b", 7.242e9}, {"opt-6.7b", 6.658e9}};
  for (const auto& [name, count] : params) {
    auto shape = FindDummyShape(name);
    ASSERT_TRUE(shape.ok()) << name;
    EXPECT_NEAR(DummyWeightBytes(*shape) / 2.0, count, count * 0.005) << name;
    auto c = ModelConfig::FromJson(DummyConfigJson(*shape), name);
    ASSERT_TRUE(c.ok()) << c.status();
  }
  auto llama = ModelConfig::FromJson(DummyConfigJson(*FindDummyShape("llama-3-8b")), "l");
  auto opt = ModelConfig::FromJson(DummyConfigJson(*FindDummyShape("opt-6.7b")), "o");
  const uint64_t l = offload::KvCacheBytes(KvSpec(*llama, 32, 544)).device, o = offload::KvCacheBytes(KvSpec(*opt, 32, 544)).device;
  EXPECT_EQ(o, 4 * l);
  EXPECT_EQ(l, 2ull * 32 * 32 * 544 * 8 * 128 * 4);
}

}  // namespace
}  // namespace ferry::engine
