// ferry bench's measurement and dummy models: the numbers are consistent with the plan (every
// decode step moves each streamed layer once), budgets hold, and dummy stores load and run.
#include "engine/bench.h"

#include <algorithm>
#include <cmath>

#include "engine/dummy_model.h"
#include "engine/model.h"
#include "engine/sparsity.h"
#include "gtest/gtest.h"
#include "io/store.h"
#include "offload/host_kv_cache.h"
#include "kernels/cpu/cpu_backend.h"
#include "test_util.h"

namespace ferry::engine {
namespace {

TEST(BenchTest, MetricsAreConsistentWithThePlan) {
  ferry::testing::TempDir dir;
  ASSERT_TRUE(io::ConvertToStore(ferry::testing::ModelDir(), dir.path()).ok());
  BenchOptions o;
  o.store_dir = dir.path();
  o.prompt_len = 16;
  o.gen_len = 5;
  o.policy.gpu_batch_size = 3;
  o.policy.num_gpu_batches = 2;
  o.policy.split = {20, 30, 50};
  o.backend.memory_budget_bytes = 64 << 20;
  o.backend.host_budget_bytes = 32 << 20;
  int lines = 0;
  o.progress = [&](const std::string&) { ++lines; };
  auto r = RunBench(o);
  ASSERT_TRUE(r.ok()) << r.status();
  const auto& j = r->json;
  EXPECT_EQ(j["batch"], 6);
  EXPECT_GT(j["throughput_tok_s"].get<double>(), 0.0);
  EXPECT_NEAR(j["throughput_tok_s"].get<double>(), 6 * 5 / j["total_s"].get<double>(), 1e-6);
  const uint64_t per_step = j["bytes_per_step"]["pinned_to_device"];
  EXPECT_GT(per_step, 0u);
  // 5 forward passes, each streaming every layer once; prefetch may add up to one pass more.
  const uint64_t moved = j["bytes_moved"]["pinned_to_device"];
  EXPECT_GE(moved, 5 * per_step);
  EXPECT_LE(moved, 6 * per_step);
  EXPECT_GT(j["probe_GBps"]["disk"].get<double>(), 0.0);
  // The disk is probed before and after the run, 8 timed segments each; the floor uses the faster
  // of the two medians.
  auto median = [](std::vector<double> seg) {
    EXPECT_EQ(seg.size(), 8u);
    if (seg.size() != 8) return 0.0;
    std::sort(seg.begin(), seg.end());
    EXPECT_GT(seg[0], 0.0);
    return (seg[3] + seg[4]) / 2;
  };
  const double before = median(j["disk_probe_segments_GBps"].get<std::vector<double>>());
  const double after = median(j["disk_probe_after_segments_GBps"].get<std::vector<double>>());
  EXPECT_DOUBLE_EQ(j["probe_GBps"]["disk"].get<double>(), std::max(before, after));
  EXPECT_NE(r->Table().find("disk probe segments"), std::string::npos);
  EXPECT_NE(r->Table().find("after (the floor: the faster median)"), std::string::npos);
  // The prefill streams every layer once (give or take the two layers read ahead), at a positive rate.
  const double prefill_disk = j["prefill_link_GBps"]["disk"].get<double>() * 1e9 * j["prefill_s"].get<double>();
  EXPECT_GT(prefill_disk, 0.0);
  EXPECT_LE(prefill_disk, 2.0 * j["bytes_per_step"]["disk_to_pinned"].get<double>());
  EXPECT_EQ(j["floor_doubtful"].get<bool>(), j["step_over_floor"].get<double>() < 0.97);
  EXPECT_GT(j["floor_step_s"].get<double>(), 0.0);
  EXPECT_LE(j["memory"]["plan_device"].get<uint64_t>(), 64u << 20);
  EXPECT_GE(lines, 5);
  EXPECT_NE(r->Table().find("achieved/floor"), std::string::npos);

  o.backend.memory_budget_bytes = 4 << 20;  // cannot hold the embeddings and the KV cache
  auto refused = RunBench(o);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  o.backend.memory_budget_bytes = 0;
  o.prompt_len = 600;
  EXPECT_EQ(RunBench(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// H2O with the KV cache on the CPU: the evicting cache lives in host memory, counted in the host
// plan, and the bench runs through it.
TEST(BenchTest, H2OWithTheKvCacheOnTheCpu) {
  ferry::testing::TempDir dir;
  ASSERT_TRUE(io::ConvertToStore(ferry::testing::ModelDir(), dir.path()).ok());
  BenchOptions o;
  o.store_dir = dir.path();
  o.prompt_len = 24;
  o.gen_len = 4;
  o.policy.gpu_batch_size = 2;
  o.policy.num_gpu_batches = 2;
  o.policy.split = {0, 100, 0};
  o.policy.kv_on_cpu = true;
  o.policy.h2o = offload::H2OOptions{8, 8, 0};
  auto r = RunBench(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->json["kv_cache"].get<std::string>(), "h2o 8+8, on the CPU");
  auto dense_cpu = [&] {
    BenchOptions d = o;
    d.policy.h2o.reset();
    return RunBench(d);
  }();
  ASSERT_TRUE(dense_cpu.ok());
  // The host plan counts each cache: the difference between the two runs is the difference of
  // their host bytes.
  auto config = ModelConfig::FromModelDir(dir.path());
  ASSERT_TRUE(config.ok());
  const int64_t h2o_bytes = static_cast<int64_t>(offload::HostH2OCache::Bytes(config->num_layers, config->num_heads,
                                                                              config->head_dim(), 4, *o.policy.h2o, 2, 24));
  const int64_t dense_bytes = static_cast<int64_t>(offload::HostKvCache::Bytes(config->num_layers, config->hidden_size, 4, 28));
  EXPECT_EQ(r->json["memory"]["plan_pinned"].get<int64_t>() - dense_cpu->json["memory"]["plan_pinned"].get<int64_t>(),
            h2o_bytes - dense_bytes);
}

TEST(BenchTest, H2OFitsALargerBatchInTheSameBudget) {
  ferry::testing::TempDir dir;
  ASSERT_TRUE(io::ConvertToStore(ferry::testing::ModelDir(), dir.path()).ok());
  BenchOptions o;
  o.store_dir = dir.path();
  o.prompt_len = 200;
  o.gen_len = 3;
  o.policy.num_gpu_batches = 8;
  o.policy.split = {0, 100, 0};
  o.backend.memory_budget_bytes = 48 << 20;
  o.fit_batch = true;
  auto full = RunBench(o);
  ASSERT_TRUE(full.ok()) << full.status();
  o.policy.h2o = offload::H2OOptions{20, 20, 0};
  auto h2o = RunBench(o);
  ASSERT_TRUE(h2o.ok()) << h2o.status();
  const int full_batch = full->json["batch"], h2o_batch = h2o->json["batch"];
  EXPECT_GE(full_batch, 2);
  EXPECT_GE(h2o_batch, 2 * full_batch);  // 41 slots instead of 203 positions per head
  EXPECT_EQ(h2o->json["kv_cache"], "h2o 20+20");
  for (const auto* r : {&*full, &*h2o}) EXPECT_LE(r->json["memory"]["plan_device"].get<uint64_t>(), 48u << 20);
  // F16 keys and values: half the cache, so a larger batch (the workspace does not halve); two GPU
  // batches, so the batch moves in steps of 2.
  o.policy.num_gpu_batches = 2;
  o.policy.h2o.reset();
  auto full32 = RunBench(o);
  o.policy.kv_dtype = DType::kF16;
  auto full16 = RunBench(o);
  ASSERT_TRUE(full32.ok() && full16.ok()) << full32.status() << full16.status();
  const int full32_batch = full32->json["batch"], full16_batch = full16->json["batch"];
  EXPECT_GT(full16_batch, full32_batch * 5 / 4) << full32_batch << " -> " << full16_batch;
  EXPECT_EQ(full16->json["kv_dtype"], "F16");
  EXPECT_LE(full16->json["memory"]["plan_device"].get<uint64_t>(), 48u << 20);
  // q8 keys and values (8.5 bits with the group scales): larger again, within the same budget.
  o.policy.kv_dtype = *ParseKvType("q8", 16);
  auto full8 = RunBench(o);
  ASSERT_TRUE(full8.ok()) << full8.status();
  const int full8_batch = full8->json["batch"];
  EXPECT_GT(full8_batch, full16_batch) << full16_batch << " -> " << full8_batch;
  EXPECT_EQ(full8->json["kv_dtype"], "q8g16");
  EXPECT_LE(full8->json["memory"]["plan_device"].get<uint64_t>(), 48u << 20);
  o.policy.kv_dtype = DType::kF32;
  o.policy.num_gpu_batches = 8;
  o.policy.h2o = offload::H2OOptions{20, 20, 0};
  o.fit_batch = true;
  o.backend.memory_budget_bytes = 2 << 20;
  EXPECT_EQ(RunBench(o).status().code(), absl::StatusCode::kResourceExhausted);
}

// --sparsity-sim through the executor: at batch 1 each decode step fetches exactly round(density x
// ffn) bundles per layer, far fewer bytes than the dense step, and the link floor counts them.
TEST(BenchTest, SparsitySimFetchesTheDrawnBundlesOnly) {
  ferry::testing::TempDir dir;
  ASSERT_TRUE(io::ConvertToStore(ferry::testing::ModelDir(), dir.path()).ok());
  BenchOptions o;
  o.store_dir = dir.path();
  o.prompt_len = 16;
  o.gen_len = 4;
  o.policy.split = {0, 100, 0};
  auto dense = RunBench(o);
  ASSERT_TRUE(dense.ok()) << dense.status();
  o.sparsity_sim = 0.15;
  auto sparse = RunBench(o);
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  const auto& j = sparse->json;
  auto config = ModelConfig::FromModelDir(dir.path());
  ASSERT_TRUE(config.ok());
  const uint64_t bundle = ((2 * config->hidden_size + 1) * 2 + 15) / 16 * 16;  // fp16, rows padded to 16 bytes
  const uint64_t k = static_cast<uint64_t>(std::lround(0.15 * config->ffn_dim));
  EXPECT_EQ(j["sparse_ffn"]["bundle_bytes_per_step"].get<uint64_t>(), config->num_layers * k * bundle);
  EXPECT_NEAR(j["sparse_ffn"]["fetched_fraction"].get<double>(), 0.15, 0.001);
  const uint64_t dense_step = dense->json["bytes_per_step"]["pinned_to_device"].get<uint64_t>();
  const uint64_t sparse_step = j["bytes_per_step"]["pinned_to_device"].get<uint64_t>();
  EXPECT_LT(sparse_step * 2, dense_step);  // attention (1/3) + 15% of the FFN (2/3)
  EXPECT_NE(sparse->Table().find("sparse FFN"), std::string::npos);
  // Half of each FFN cached on the device: some draws are found there and the bundles crossing the
  // link per step drop by exactly those; the plan grows by the cache.
  o.sparsity_cache = 0.5;
  auto cached = RunBench(o);
  ASSERT_TRUE(cached.ok()) << cached.status();
  const auto& jc = cached->json["sparse_ffn"];
  const double hit_rate = jc["device_cache_hit_rate"].get<double>();
  EXPECT_GT(hit_rate, 0.1);
  EXPECT_LT(hit_rate, 0.6);
  EXPECT_NEAR(jc["bundle_bytes_per_step"].get<double>(), (1.0 - hit_rate) * config->num_layers * k * bundle, bundle * 1.0);
  EXPECT_GE(cached->json["memory"]["plan_device"].get<uint64_t>(),
            j["memory"]["plan_device"].get<uint64_t>() + config->num_layers * (config->ffn_dim / 2) * bundle);
  EXPECT_NE(cached->Table().find("bundle cache on the device"), std::string::npos);
  o.sparsity_cache = 0.0;
  o.sparsity_dir = "/nonexistent";
  EXPECT_FALSE(RunBench(o).ok());  // both at once
  o.sparsity_dir.clear();
  o.sparsity_sim = 0.0;
  o.sparsity_cache = 0.5;
  EXPECT_EQ(RunBench(o).status().code(), absl::StatusCode::kInvalidArgument);  // a cache without sparsity
}

// The measured choice to run a layer dense: after its probe calls, a layer whose union reached the
// threshold stops asking the predictor and takes every neuron; the others keep asking.
TEST(BenchTest, LayersWithALargeMeasuredUnionRunDense) {
  const int ffn = 100;
  std::vector<int> asked(3, 0);
  FfnSelector inner = [&](int layer, const TensorView&) -> absl::StatusOr<std::vector<int32_t>> {
    ++asked[layer];
    std::vector<int32_t> out;
    for (int j = 0; j < (layer == 1 ? 95 : 10); ++j) out.push_back(j);
    return out;
  };
  AdaptiveFfnSelector adaptive(inner, 3, ffn, 0.9, /*probe=*/2);
  for (int call = 0; call < 5; ++call) {
    for (int layer = 1; layer < 3; ++layer) {
      auto chosen = adaptive(layer, TensorView{});
      ASSERT_TRUE(chosen.ok());
      EXPECT_EQ(chosen->size(), layer == 1 && call >= 2 ? 100u : layer == 1 ? 95u : 10u) << layer << " " << call;
    }
  }
  EXPECT_EQ(asked[1], 2);
  EXPECT_EQ(asked[2], 5);
  EXPECT_EQ(adaptive.dense_layers(), std::vector<int>{1});
  EXPECT_NEAR(adaptive.probed_fraction(2), 0.10, 1e-12);
  EXPECT_EQ(adaptive.probed_fraction(0), -1.0);
}

TEST(DummyModelTest, Opt125mStoreLoadsAndRuns) {
  auto shape = FindDummyShape("opt-125m");
  ASSERT_TRUE(shape.ok());
  EXPECT_EQ(FindDummyShape("opt-7b").status().code(), absl::StatusCode::kInvalidArgument);
  ferry::testing::TempDir dir;
  uint64_t last = 0;
  DummyStoreOptions o;
  o.progress = [&](uint64_t done, uint64_t total) { last = done; EXPECT_LE(done, total); };
  ASSERT_TRUE(WriteDummyStore(*shape, dir.path(), o).ok());
  EXPECT_EQ(last, DummyWeightBytes(*shape));
  auto store = io::Store::Open(dir.path());
  ASSERT_TRUE(store.ok());
  EXPECT_EQ(store->layers().size(), 12u);
  ASSERT_TRUE(store->Verify().ok());
  kernels::CpuBackend cpu;
  OffloadOptions off;
  off.split = {0, 100, 0};
  auto m = Model::LoadOffloaded(dir.path(), &cpu, off);
  ASSERT_TRUE(m.ok()) << m.status();
  auto cache = offload::CreateKvCache(cpu, KvSpec((*m)->config(), 1, 4));
  std::vector<float> logits;
  ASSERT_TRUE((*m)->Forward({{2, 100, 200}, {0, 0, 0}, {0, 1, 2}, {2}}, **cache, &logits).ok());
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  // The same seed writes the same weights.
  ferry::testing::TempDir again;
  ASSERT_TRUE(WriteDummyStore(*shape, again.path()).ok());
  auto a = ReadFileToString(dir.File("manifest.json")), b = ReadFileToString(again.File("manifest.json"));
  EXPECT_EQ(*a, *b);
}

}  // namespace
}  // namespace ferry::engine
