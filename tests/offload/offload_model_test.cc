// Offloaded execution on the CPU standing in for the GPU: for every weight placement the logits
// are bitwise those of the fully resident model, budgets hold, policies that cannot fit are
// refused before allocating, and disk faults come back as errors.
#include <cerrno>

#include "base/file.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/sparsity.h"
#include "gtest/gtest.h"
#include "io/store.h"
#include "offload/host_kv_cache.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

class OffloadModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    store_dir_ = new ferry::testing::TempDir();
    ASSERT_TRUE(io::ConvertToStore(ferry::testing::ModelDir(), store_dir_->path()).ok());
  }
  static void TearDownTestSuite() { delete store_dir_; }

  // Logits of a prefill of two prompts, then three decode steps, all positions kept; with
  // `micro`, each sequence is its own micro-batch (FlexGen's GPU batches).
  static std::vector<float> Run(Model& m, kernels::Backend& b, bool micro = false, const FfnSelector* select = nullptr,
                                const std::function<absl::Status(int, const TensorView&, const TensorView&)>* hook = nullptr) {
    auto cache = offload::CreateKvCache(b, KvSpec(m.config(), 2, 16));
    EXPECT_TRUE(cache.ok());
    std::vector<float> all, logits;
    ForwardBatch pre{{2, 1248, 262, 2732, 2, 1777, 554}, {0, 0, 0, 0, 1, 1, 1}, {0, 1, 2, 3, 0, 1, 2}, {0, 1, 2, 3, 4, 5, 6}};
    if (micro) pre.micro_batch_ends = {4, 7};
    EXPECT_TRUE(m.Forward(pre, **cache, &logits).ok());
    all.insert(all.end(), logits.begin(), logits.end());
    for (int step = 0; step < 3; ++step) {
      ForwardBatch dec{{406 + step, 342 + step}, {0, 1}, {4 + step, 3 + step}, {0, 1}};
      if (micro) dec.micro_batch_ends = {1, 2};
      dec.ffn_select = select;
      dec.ffn_hook = hook;
      const absl::Status s = m.Forward(dec, **cache, &logits);
      EXPECT_TRUE(s.ok()) << s;
      all.insert(all.end(), logits.begin(), logits.end());
    }
    return all;
  }

  // A 30% random selection per token for the sparse model `m` (micro-batches of one sequence),
  // and the same draws zeroing the other neurons of the dense `resident` model: the sparse logits,
  // their largest difference to the dense ones relative to the largest logit, and the neurons
  // selected.
  struct ZeroedRun {
    std::vector<float> got;
    double rel_diff = 0;
    uint64_t selected = 0;
  };
  static ZeroedRun RunAgainstZeroedDense(Model& m, kernels::Backend& b, Model& resident, kernels::Backend& rb) {
    const int ffn = resident.config().ffn_dim;
    const FfnSelector sparse_select = RandomFfnSelector(ffn, 0.3, 11), hook_select = RandomFfnSelector(ffn, 0.3, 11);
    ZeroedRun r;
    const FfnSelector counting = [&](int layer, const TensorView& x) -> absl::StatusOr<std::vector<int32_t>> {
      auto s = sparse_select(layer, x);
      if (s.ok()) r.selected += s->size();
      return s;
    };
    const std::function<absl::Status(int, const TensorView&, const TensorView&)> zero_others =
        [&](int layer, const TensorView& x, const TensorView& act) -> absl::Status {
      FERRY_ASSIGN_OR_RETURN(std::vector<int32_t> keep, hook_select(layer, x));
      std::vector<uint8_t> on(static_cast<size_t>(ffn), 0);
      for (int32_t j : keep) on[j] = 1;
      for (int64_t t = 0; t < act.shape[0]; ++t) {
        for (int j = 0; j < ffn; ++j) {
          if (!on[j]) act.as<float>()[t * ffn + j] = 0.0f;
        }
      }
      return absl::OkStatus();
    };
    r.got = Run(m, b, /*micro=*/true, &counting);
    const std::vector<float> want = Run(resident, rb, /*micro=*/true, nullptr, &zero_others);
    EXPECT_EQ(r.got.size(), want.size());
    double diff = 0, mag = 0;
    for (size_t i = 0; i < std::min(r.got.size(), want.size()); ++i) {
      diff = std::max(diff, static_cast<double>(std::abs(r.got[i] - want[i])));
      mag = std::max(mag, static_cast<double>(std::abs(want[i])));
    }
    r.rel_diff = r.got.size() == want.size() ? diff / mag : INFINITY;
    return r;
  }

  static ferry::testing::TempDir* store_dir_;
};
ferry::testing::TempDir* OffloadModelTest::store_dir_ = nullptr;

TEST_F(OffloadModelTest, EveryPlacementGivesBitIdenticalLogits) {
  kernels::CpuBackend resident_backend;
  auto resident = Model::Load(ferry::testing::ModelDir(), &resident_backend);
  ASSERT_TRUE(resident.ok());
  const std::vector<float> expected = Run(**resident, resident_backend);
  for (const offload::WeightSplit split : {offload::WeightSplit{100, 0, 0}, offload::WeightSplit{0, 100, 0},
                                          offload::WeightSplit{0, 0, 100}, offload::WeightSplit{30, 30, 40},
                                          offload::WeightSplit{0, 50, 50}, offload::WeightSplit{67, 0, 33}}) {
    kernels::CpuBackend backend;
    OffloadOptions o;
    o.split = split;
    o.streamer.uring.block_bytes = 64 << 10;
    auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(Run(**m, backend), expected) << split.gpu << "," << split.cpu << "," << split.disk;
    EXPECT_EQ(Run(**m, backend, /*micro=*/true), expected) << "micro-batches " << split.gpu << "," << split.cpu;
    const auto* streamer = (*m)->streamer();
    const uint64_t passes = 8;  // forward calls
    uint64_t disk = 0, h2d = 0;
    for (const auto& l : (*m)->plan().layers) {
      disk += l.streamed() ? l.disk_bytes() : 0;
      h2d += l.streamed() ? l.cpu_bytes() + l.disk_bytes() : 0;
    }
    // Every pass moved each streamed layer once (the pipeline may already prefetch the next pass).
    EXPECT_GE(streamer->stats().disk_bytes, passes * disk);
    EXPECT_GE(streamer->stats().h2d_bytes, passes * h2d);
  }
}

// Deja Vu through the executor: FC1/FC2 stay out of the stream and come as bundles. Every neuron
// (no selector, or a selector keeping all) gives the resident model's logits bit for bit; a
// partial selection gives the logits of the dense model with the other neurons zeroed, and moves
// exactly the selected bundles.
TEST_F(OffloadModelTest, SparseFfnFetchesOnlyTheSelectedBundles) {
  kernels::CpuBackend resident_backend;
  auto resident = Model::Load(ferry::testing::ModelDir(), &resident_backend);
  ASSERT_TRUE(resident.ok());
  const std::vector<float> expected = Run(**resident, resident_backend);
  const ModelConfig& c = (*resident)->config();
  for (const offload::WeightSplit split : {offload::WeightSplit{0, 100, 0}, offload::WeightSplit{0, 0, 100},
                                          offload::WeightSplit{30, 30, 40}}) {
    kernels::CpuBackend backend;
    OffloadOptions o;
    o.split = split;
    o.sparse_ffn = true;
    o.streamer.uring.block_bytes = 64 << 10;
    auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_TRUE((*m)->sparse_ffn());
    EXPECT_EQ(Run(**m, backend), expected) << split.gpu << "," << split.cpu << "," << split.disk;
    const FfnSelector all = RandomFfnSelector(c.ffn_dim, 1.0, 3);
    EXPECT_EQ(Run(**m, backend, /*micro=*/true, &all), expected);
    // With a disk share the bundles come from the store's ffn_bundles.bin, page by page.
    EXPECT_EQ((*m)->bundles()->disk_bytes_read() > 0, split.disk > 0) << split.disk;
    // The attention part alone is placed and streamed: about a third of each layer's region.
    auto store = io::Store::Open(store_dir_->path());
    ASSERT_TRUE(store.ok());
    for (size_t l = 0; l < (*m)->plan().layers.size(); ++l) {
      EXPECT_LT((*m)->plan().layers[l].bytes * 2, store->layers()[l].bytes) << "layer " << l;
    }
  }

  // 30% of the neurons per token, two sequences each their own micro-batch: the same draws zero
  // the other neurons in the dense resident model; bundles from pinned memory, then from disk.
  for (const offload::WeightSplit split : {offload::WeightSplit{0, 100, 0}, offload::WeightSplit{0, 0, 100}}) {
    kernels::CpuBackend backend;
    OffloadOptions o;
    o.split = split;
    o.sparse_ffn = true;
    auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
    ASSERT_TRUE(m.ok()) << m.status();
    const uint64_t before = (*m)->bundles()->bytes_moved();
    const ZeroedRun r = RunAgainstZeroedDense(**m, backend, **resident, resident_backend);
    const std::vector<float>& got = r.got;
    const uint64_t selected = r.selected;
    EXPECT_LT(r.rel_diff, 1e-5);
    EXPECT_NE(got, expected);  // the selection did change the model
    // The prefill fetched every bundle once per layer and micro-batch; the decode steps only the selected.
    const uint64_t prefill = 2ull * c.num_layers * c.ffn_dim * (*m)->bundles()->bundle_bytes();
    EXPECT_EQ((*m)->bundles()->bytes_moved() - before, prefill + selected * (*m)->bundles()->bundle_bytes());
    EXPECT_GT(selected, 0u);
    EXPECT_LT(selected, 3ull * 2 * c.num_layers * c.ffn_dim / 2);  // 30% per token, one token per micro-batch
    if (split.disk > 0) {
      // Page-rounded reads of the selected bundles: at least their bytes, at most a few pages more per bundle.
      EXPECT_GE((*m)->bundles()->disk_bytes_read(), prefill + selected * (*m)->bundles()->bundle_bytes());
    }
  }
}

// The device-side bundle cache: selected neurons already there are copied on the device and only
// the others cross the link. Random 30% selections with half the FFN cached give the logits of the
// dense model with the other neurons zeroed (the rows come in another order: 1e-5) and move only the
// misses; a selection repeated call after call moves nothing after its first call; the plan counts
// the cache.
TEST_F(OffloadModelTest, DeviceBundleCacheMovesOnlyTheMisses) {
  kernels::CpuBackend resident_backend;
  auto resident = Model::Load(ferry::testing::ModelDir(), &resident_backend);
  ASSERT_TRUE(resident.ok());
  const ModelConfig& c = (*resident)->config();
  for (const offload::WeightSplit split : {offload::WeightSplit{0, 100, 0}, offload::WeightSplit{0, 0, 100}}) {
    kernels::CpuBackend backend, plain_backend;
    OffloadOptions o;
    o.split = split;
    o.sparse_ffn = true;
    auto plain = Model::LoadOffloaded(store_dir_->path(), &plain_backend, o);
    o.sparse_cache_fraction = 0.5;
    auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
    ASSERT_TRUE(m.ok() && plain.ok()) << m.status();
    EXPECT_EQ((*m)->bundles()->cache_rows(), c.ffn_dim / 2);
    EXPECT_GE((*m)->plan().device_bytes, (*plain)->plan().device_bytes + c.num_layers * (c.ffn_dim / 2) * (*m)->bundles()->bundle_bytes());
    const uint64_t before = (*m)->bundles()->bytes_moved();
    const ZeroedRun r = RunAgainstZeroedDense(**m, backend, **resident, resident_backend);
    EXPECT_LT(r.rel_diff, 1e-5) << split.disk;
    const uint64_t hits = (*m)->bundles()->cache_hits(), misses = (*m)->bundles()->cache_misses();
    EXPECT_EQ(hits + misses, r.selected);
    EXPECT_GT(hits, 0u);
    const uint64_t prefill = 2ull * c.num_layers * c.ffn_dim * (*m)->bundles()->bundle_bytes();  // every neuron: not cached
    EXPECT_EQ((*m)->bundles()->bytes_moved() - before, prefill + misses * (*m)->bundles()->bundle_bytes());

    // The same 20% every call: after the first decode call every selected neuron is a hit.
    std::vector<int32_t> fixed;
    for (int j = 0; j < c.ffn_dim; j += 5) fixed.push_back(j);
    const FfnSelector same = [&](int, const TensorView&) -> absl::StatusOr<std::vector<int32_t>> { return fixed; };
    const uint64_t misses0 = (*m)->bundles()->cache_misses();
    Run(**m, backend, /*micro=*/false, &same);
    // The first call of this run finds the neurons cached by the previous run only by chance; from
    // the second on, all are there.
    EXPECT_LE((*m)->bundles()->cache_misses() - misses0, static_cast<uint64_t>(c.num_layers) * fixed.size());
  }
}

TEST_F(OffloadModelTest, KvCacheOnTheCpuGivesBitIdenticalLogits) {
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = {0, 50, 50};
  auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
  ASSERT_TRUE(m.ok());
  const ModelConfig& c = (*m)->config();
  auto dense = offload::CreateKvCache(backend, KvSpec(c, 2, 16));
  auto host = offload::HostKvCache::Create(backend, c.num_layers, c.hidden_size, 2, 16);
  ASSERT_TRUE(dense.ok() && host.ok());
  const size_t pinned_before = backend.host_allocated_bytes();
  EXPECT_EQ(offload::HostKvCache::Bytes(c.num_layers, c.hidden_size, 2, 16), pinned_before - (*m)->plan().host_bytes);
  std::vector<float> a, b;
  ForwardBatch pre{{2, 1248, 262, 2732, 2, 1777, 554}, {0, 0, 0, 0, 1, 1, 1}, {0, 1, 2, 3, 0, 1, 2}, {3, 6}};
  ASSERT_TRUE((*m)->Forward(pre, **dense, &a).ok());
  ASSERT_TRUE((*m)->Forward(pre, **host, &b).ok());
  EXPECT_EQ(a, b);
  for (int step = 0; step < 3; ++step) {
    ForwardBatch dec{{406 + step, 342 + step}, {0, 1}, {4 + step, 3 + step}, {0, 1}};
    ASSERT_TRUE((*m)->Forward(dec, **dense, &a).ok());
    ASSERT_TRUE((*m)->Forward(dec, **host, &b).ok());
    EXPECT_EQ(a, b) << "step " << step;
  }
  ForwardBatch past{{5}, {0}, {16}, {0}};
  EXPECT_EQ((*m)->Forward(past, **host, &b).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(OffloadModelTest, GreedyGenerationIsTheSame) {
  kernels::CpuBackend a, b;
  auto resident = Model::Load(ferry::testing::ModelDir(), &a);
  OffloadOptions o;
  o.split = {10, 20, 70};
  auto off = Model::LoadOffloaded(store_dir_->path(), &b, o);
  ASSERT_TRUE(off.ok()) << off.status();
  GenerateOptions g;
  g.max_new_tokens = 12;
  std::vector<GenerationRequest> reqs = {{{2, 1248, 262, 2732, 406, 4156}, 0}, {{2, 1777, 554}, 1}};
  auto x = Generate(**resident, reqs, g);
  auto y = Generate(**off, reqs, g);
  ASSERT_TRUE(x.ok() && y.ok()) << y.status();
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ((*x)[i].tokens, (*y)[i].tokens);

  // One prefill call per prompt (micro-batch cap 4 tokens), then both prompts in one call as two
  // micro-batches: the same tokens, and the weights cross the link once less.
  g.max_prefill_tokens = 4;
  const uint64_t h2d0 = (*off)->streamer()->stats().h2d_bytes;
  auto apart = Generate(**off, reqs, g);
  const uint64_t h2d1 = (*off)->streamer()->stats().h2d_bytes;
  g.prefill_call_tokens = 1000;
  auto together = Generate(**off, reqs, g);
  const uint64_t h2d2 = (*off)->streamer()->stats().h2d_bytes;
  ASSERT_TRUE(apart.ok() && together.ok()) << together.status();
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ((*apart)[i].tokens, (*x)[i].tokens);
    EXPECT_EQ((*together)[i].tokens, (*x)[i].tokens);
  }
  EXPECT_LT(h2d2 - h2d1, h2d1 - h2d0) << h2d2 - h2d1 << " vs " << h2d1 - h2d0;
}

TEST_F(OffloadModelTest, BudgetsHoldAndTooSmallBudgetsAreRefusedBeforeAllocating) {
  // Budgets that fit: the backend never goes past them.
  const uint64_t device_budget = 14 << 20, host_budget = 6 << 20;
  kernels::CpuBackend backend(kernels::CpuBackendOptions{device_budget, host_budget});
  OffloadOptions o;
  o.split = {20, 40, 40};
  o.device_budget = device_budget;
  o.host_budget = host_budget;
  o.reserve_device_bytes = 2 << 20;  // KV cache + activations of Run()
  auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
  ASSERT_TRUE(m.ok()) << m.status();
  Run(**m, backend);
  EXPECT_LE(backend.peak_allocated_bytes(), device_budget);
  EXPECT_LE(backend.peak_host_allocated_bytes(), host_budget);
  EXPECT_LE((*m)->plan().device_bytes, device_budget);

  // A micro-batch boundary inside a sequence is refused.
  auto c2 = offload::CreateKvCache(backend, KvSpec((*m)->config(), 2, 16));
  std::vector<float> logits;
  ForwardBatch split{{2, 5, 2, 6}, {0, 0, 1, 1}, {0, 1, 0, 1}, {1, 3}};
  split.micro_batch_ends = {1, 4};
  EXPECT_EQ((*m)->Forward(split, **c2, &logits).code(), absl::StatusCode::kInvalidArgument);

  // Too small: refused by the plan, with nothing allocated.
  kernels::CpuBackend small(kernels::CpuBackendOptions{1 << 20, 0});
  o.device_budget = 1 << 20;
  o.split = {100, 0, 0};
  auto refused = Model::LoadOffloaded(store_dir_->path(), &small, o);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("over by"), std::string::npos) << refused.status();
  EXPECT_EQ(small.peak_allocated_bytes(), 0u);
  EXPECT_EQ(small.peak_host_allocated_bytes(), 0u);
}

// The disk tier's ffn_bundles.bin is derived from the store: its stamp holds the FC1/FC2
// checksums, and a file whose stamp does not match (a reconverted store) is rebuilt, not used.
TEST_F(OffloadModelTest, StaleBundleFileIsRebuilt) {
  kernels::CpuBackend resident_backend;
  auto resident = Model::Load(ferry::testing::ModelDir(), &resident_backend);
  ASSERT_TRUE(resident.ok());
  const std::vector<float> expected = Run(**resident, resident_backend);
  OffloadOptions o;
  o.split = {0, 0, 100};
  o.sparse_ffn = true;
  {
    kernels::CpuBackend backend;
    auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
    ASSERT_TRUE(m.ok()) << m.status();
  }
  const std::string bin = store_dir_->File("ffn_bundles.bin"), stamp = store_dir_->File("ffn_bundles.json");
  auto size = ReadFileToString(bin);
  ASSERT_TRUE(size.ok());
  ferry::testing::WriteFile(bin, std::string(size->size(), '\0'));  // wrong contents, right size
  auto text = ReadFileToString(stamp);
  ASSERT_TRUE(text.ok());
  auto j = nlohmann::json::parse(*text);
  j["xxh3"][0] = j["xxh3"][0].get<uint64_t>() ^ 1;  // as if FC1 of layer 0 had changed
  ferry::testing::WriteFile(stamp, j.dump());
  kernels::CpuBackend backend;
  auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(Run(**m, backend), expected);
}

// `ferry generate --weights ... --sparsity`: Generate passes the selector to every decode step of
// a sparse-FFN model (the prefill computes every neuron); keeping every neuron, the text is the
// resident model's.
TEST_F(OffloadModelTest, GenerateUsesTheSelectorInDecodeSteps) {
  kernels::CpuBackend resident_backend;
  auto resident = Model::Load(ferry::testing::ModelDir(), &resident_backend);
  ASSERT_TRUE(resident.ok());
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = {0, 100, 0};
  o.sparse_ffn = true;
  auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
  ASSERT_TRUE(m.ok()) << m.status();
  const int ffn = (*m)->config().ffn_dim, layers = (*m)->config().num_layers;
  int calls = 0;
  const FfnSelector all = [&](int, const TensorView&) -> absl::StatusOr<std::vector<int32_t>> {
    ++calls;
    std::vector<int32_t> v(static_cast<size_t>(ffn));
    for (int j = 0; j < ffn; ++j) v[j] = j;
    return v;
  };
  GenerateOptions g;
  g.max_new_tokens = 10;
  g.min_new_tokens = 10;
  auto want = Generate(**resident, {{{2, 1248, 262, 2732}, 0}}, g);
  g.ffn_select = &all;
  auto got = Generate(**m, {{{2, 1248, 262, 2732}, 0}}, g);
  ASSERT_TRUE(want.ok() && got.ok()) << got.status();
  EXPECT_EQ((*got)[0].tokens, (*want)[0].tokens);
  EXPECT_EQ(calls, 9 * layers);  // nine decode steps; the prefill computes every neuron
}

// The sparse FFN's pinned bundles and device gather buffer are in the plan: budgets that fit hold
// (peaks measured), a host budget too small for the bundles is refused before allocating.
TEST_F(OffloadModelTest, SparseFfnBudgetsHold) {
  kernels::CpuBackend probe;
  OffloadOptions o;
  o.split = {0, 100, 0};
  o.sparse_ffn = true;
  o.reserve_device_bytes = 2 << 20;
  auto store = io::Store::Open(store_dir_->path());
  ASSERT_TRUE(store.ok());
  auto plan = Model::PlanOffload(*store, o, probe);
  ASSERT_TRUE(plan.ok()) << plan.status();
  o.device_budget = plan->device_bytes;
  o.host_budget = plan->host_bytes;
  kernels::CpuBackend backend(kernels::CpuBackendOptions{o.device_budget, o.host_budget});
  auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
  ASSERT_TRUE(m.ok()) << m.status();
  Run(**m, backend);
  EXPECT_LE(backend.peak_allocated_bytes(), o.device_budget);
  EXPECT_LE(backend.peak_host_allocated_bytes(), o.host_budget);

  o.host_budget = plan->host_bytes - (1 << 20);
  kernels::CpuBackend small(kernels::CpuBackendOptions{o.device_budget, o.host_budget});
  auto refused = Model::LoadOffloaded(store_dir_->path(), &small, o);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(small.peak_host_allocated_bytes(), 0u);
}

TEST_F(OffloadModelTest, DiskErrorsAreReportedNotCrashedOn) {
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = {0, 0, 100};
  int reads = 0;
  o.streamer.uring.fault_hook = [&reads](int res, size_t) { return ++reads > 20 ? -EIO : res; };
  o.streamer.uring.block_bytes = 64 << 10;
  auto m = Model::LoadOffloaded(store_dir_->path(), &backend, o);
  ASSERT_TRUE(m.ok()) << m.status();
  auto cache = offload::CreateKvCache(backend, KvSpec((*m)->config(), 1, 8));
  std::vector<float> logits;
  absl::Status s;
  for (int i = 0; i < 20 && s.ok(); ++i) {
    s = (*m)->Forward({{2, 5, 6}, {0, 0, 0}, {0, 1, 2}, {2}}, **cache, &logits);
  }
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("from disk"), std::string::npos) << s;
}

TEST_F(OffloadModelTest, OffloadingNeedsAStore) {
  kernels::CpuBackend backend;
  EXPECT_EQ(Model::LoadOffloaded(ferry::testing::ModelDir(), &backend, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::engine
