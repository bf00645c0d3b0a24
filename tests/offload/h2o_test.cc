// H2O: the slot cache against a naive reference of the eviction rule written here, on random
// inputs, batch > 1, sequences of different lengths; a budget that holds everything reproduces the
// dense cache bitwise; and the perplexities a float64 reference gave on kjv-val.
#include "offload/h2o_cache.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "base/file.h"
#include "engine/generator.h"
#include "engine/perplexity.h"
#include "offload/host_kv_cache.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "model_util.h"
#include "test_util.h"

namespace ferry::offload {
namespace {

using ferry::testing::RandomValues;

// Attend arguments over host vectors (the CPU backend's device memory is host memory).
AttendArgs HostArgs(std::vector<float>& q, std::vector<float>& k, std::vector<float>& v, std::vector<int32_t>& seq,
                    std::vector<int32_t>& pos, std::vector<float>& out, int heads, float scale) {
  const int64_t n = static_cast<int64_t>(seq.size()), w = static_cast<int64_t>(q.size()) / n;
  AttendArgs a;
  a.q = TensorView::Contiguous(q.data(), DType::kF32, {n, w});
  a.k = TensorView::Contiguous(k.data(), DType::kF32, {n, w});
  a.v = TensorView::Contiguous(v.data(), DType::kF32, {n, w});
  a.seq_ids = TensorView::Contiguous(seq.data(), DType::kI32, {n});
  a.positions = TensorView::Contiguous(pos.data(), DType::kI32, {n});
  a.host_seq_ids = &seq;
  a.host_positions = &pos;
  a.out = TensorView::Contiguous(out.data(), DType::kF32, {n, w});
  a.num_heads = heads;
  a.scale = scale;
  return a;
}

// The rule, plainly: per (seq, head) a set of held positions with float64 scores.
struct NaiveH2O {
  int heavy, recent, protect;
  std::map<std::pair<int, int>, std::map<int, double>> held;  // (seq, head) -> position -> score

  void Step(int seq, int head, int pos, const std::map<int, std::vector<float>>& keys, const float* q, int hd, float scale) {
    auto& h = held[{seq, head}];
    h[pos] = 0.0;
    double mx = -1e300;
    std::map<int, double> s;
    for (const auto& [p, score] : h) {
      double dot = 0;
      for (int d = 0; d < hd; ++d) dot += static_cast<double>(q[d]) * keys.at(p)[d];
      s[p] = dot * scale;
      mx = std::max(mx, s[p]);
    }
    double sum = 0;
    for (auto& [p, v] : s) sum += (v = std::exp(v - mx));
    for (auto& [p, score] : h) score += s[p] / sum;
    if (static_cast<int>(h.size()) <= heavy + recent) return;
    int victim = -1;
    for (const auto& [p, score] : h) {
      if (p > pos - recent || p < protect) continue;
      if (victim < 0 || score < h[victim]) victim = p;  // ascending positions: ties keep the oldest
    }
    h.erase(victim);
  }
};

TEST(H2OTest, KeepsWhatTheNaiveRuleKeeps) {
  kernels::CpuBackend cpu;
  const int layers = 1, heads = 3, hd = 8, rows = 3, w = heads * hd;
  const H2OOptions opt{4, 3, 1};
  auto cache = H2OCache::Create(cpu, layers, heads, hd, rows, opt);
  ASSERT_TRUE(cache.ok()) << cache.status();
  NaiveH2O naive{opt.heavy, opt.recent, opt.protect, {}};
  const int lengths[rows] = {40, 25, 33};
  const int starts[rows] = {0, 10, 4};  // row r joins at step starts[r]
  std::map<int, std::vector<float>> keys[rows][heads];
  std::mt19937 rng(3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int step = 0; step < 50; ++step) {
    std::vector<int32_t> seq, pos;
    for (int r = 0; r < rows; ++r) {
      const int p = step - starts[r];
      if (p >= 0 && p < lengths[r]) seq.push_back(r), pos.push_back(p);
    }
    if (seq.empty()) continue;
    const int n = static_cast<int>(seq.size());
    std::vector<float> q = RandomValues(n * w, rng(), 2.0f), k = RandomValues(n * w, rng()), v = RandomValues(n * w, rng()),
                       out(n * w);
    const AttendArgs a = HostArgs(q, k, v, seq, pos, out, heads, scale);
    ASSERT_TRUE((*cache)->Check(seq, pos).ok());
    ASSERT_TRUE((*cache)->Attend(cpu, a).ok());
    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < heads; ++h) {
        keys[seq[i]][h][pos[i]] = std::vector<float>(k.begin() + i * w + h * hd, k.begin() + i * w + (h + 1) * hd);
        naive.Step(seq[i], h, pos[i], keys[seq[i]][h], q.data() + i * w + h * hd, hd, scale);
        std::set<int> got, want;
        for (int p : (*cache)->Held(0, seq[i], h)) {
          if (p >= 0) got.insert(p);
        }
        for (const auto& [p, score] : naive.held[{seq[i], h}]) want.insert(p);
        ASSERT_EQ(got, want) << "step " << step << " row " << seq[i] << " head " << h;
        EXPECT_LE(got.size(), static_cast<size_t>(opt.heavy + opt.recent));
        if (pos[i] >= opt.protect) {
          EXPECT_TRUE(got.count(0)) << "protected position 0 was evicted";
        }
      }
    }
  }
  // Several tokens into a row that holds some run token by token, at consecutive positions.
  std::vector<int32_t> twice = {1, 1}, p2 = {40, 41}, gap = {40, 42};
  EXPECT_TRUE((*cache)->Check(twice, p2).ok());
  EXPECT_EQ((*cache)->Check(twice, gap).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(H2OCache::Create(cpu, 1, 1, 8, 1, {2, 2, 3}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(H2OTest, PrefillKeepsRecentProtectedAndTopColumnSums) {
  kernels::CpuBackend cpu;
  const int heads = 2, hd = 8, rows = 2, w = heads * hd;
  const H2OOptions opt{5, 4, 1};
  auto cache = H2OCache::Create(cpu, 1, heads, hd, rows, opt);
  ASSERT_TRUE(cache.ok());
  const int len[rows] = {20, 13};
  std::vector<int32_t> seq, pos;
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < len[r]; ++p) seq.push_back(r), pos.push_back(p);
  const int n = static_cast<int>(seq.size());
  std::vector<float> q = RandomValues(n * w, 21, 2.0f), k = RandomValues(n * w, 22), v = RandomValues(n * w, 23), out(n * w);
  const AttendArgs a = HostArgs(q, k, v, seq, pos, out, heads, 0.35f);
  ASSERT_TRUE((*cache)->Check(seq, pos).ok());
  ASSERT_TRUE((*cache)->Attend(cpu, a).ok());
  int first = 0;
  for (int r = 0; r < rows; ++r) {
    for (int h = 0; h < heads; ++h) {
      // Column sums of causal attention, in double.
      std::vector<double> col(len[r], 0.0);
      for (int i = 0; i < len[r]; ++i) {
        std::vector<double> s(i + 1);
        double mx = -1e300, sum = 0;
        for (int j = 0; j <= i; ++j) {
          double dot = 0;
          for (int d = 0; d < hd; ++d) dot += double(q[(first + i) * w + h * hd + d]) * k[(first + j) * w + h * hd + d];
          s[j] = dot * 0.35;
          mx = std::max(mx, s[j]);
        }
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int j = 0; j <= i; ++j) col[j] += s[j] / sum;
      }
      std::set<int> want;
      std::vector<int> rest;
      for (int p = 0; p < len[r]; ++p) {
        if (p > len[r] - 1 - opt.recent || p < opt.protect) {
          want.insert(p);
        } else {
          rest.push_back(p);
        }
      }
      std::stable_sort(rest.begin(), rest.end(), [&](int x, int y) { return col[x] > col[y]; });
      for (int i = 0; i < opt.heavy - opt.protect && i < static_cast<int>(rest.size()); ++i) want.insert(rest[i]);
      std::set<int> got;
      const auto held = (*cache)->Held(0, r, h);
      const auto scores = (*cache)->Scores(0, r, h);
      for (size_t j = 0; j < held.size(); ++j) {
        if (held[j] < 0) continue;
        got.insert(held[j]);
        EXPECT_NEAR(scores[j], col[held[j]], 1e-5);
      }
      EXPECT_EQ(got, want) << "row " << r << " head " << h;
    }
    first += len[r];
  }
  // The rows are no longer empty: the same positions again are not a prompt (they run token by
  // token, so the check passes), but positions out of order are refused.
  EXPECT_TRUE((*cache)->Check(seq, pos).ok());
  std::vector<int32_t> backwards = pos;
  std::swap(backwards[0], backwards[1]);
  EXPECT_EQ((*cache)->Check(seq, backwards).code(), absl::StatusCode::kInvalidArgument);
}

class H2OPerplexityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = std::move(*engine::Model::Load(ferry::testing::ModelDir(), &cpu_));
    auto tok = engine::Tokenizer::FromModelDir(ferry::testing::ModelDir());
    auto text = ReadFileToString(ferry::testing::DataDir() + "/kjv-val.txt");
    ASSERT_TRUE(text.ok());
    ids_ = *(*tok)->Encode(engine::NormalizeNewlines(*text));
  }
  double Ppl(std::optional<H2OOptions> h2o, int64_t max_tokens = 4096, DType kv_dtype = DType::kF32) {
    engine::PerplexityOptions o;
    o.window = 512;
    o.max_tokens = max_tokens;
    o.h2o = h2o;
    o.kv_dtype = kv_dtype;
    auto r = engine::ComputePerplexity(*model_, ids_, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->perplexity : 0.0;
  }
  kernels::CpuBackend cpu_;
  std::unique_ptr<engine::Model> model_;
  std::vector<int> ids_;
};

TEST_F(H2OPerplexityTest, BudgetHoldingEverythingGivesTheDenseCacheLogitsBitwise) {
  for (DType kv : {DType::kF32, DType::kF16}) {
  SCOPED_TRACE(DTypeName(kv));
  // Two sequences of different lengths, token by token, through both caches.
  const int len[2] = {120, 77};
  auto dense = offload::CreateKvCache(cpu_, engine::KvSpec(model_->config(), 2, 128, kv));
  auto h2o = H2OCache::Create(cpu_, model_->config().num_layers, model_->config().num_heads, model_->config().head_dim(), 2,
                              {100, 100, 0}, kv);
  ASSERT_TRUE(dense.ok() && h2o.ok());
  for (int t = 0; t < len[0]; ++t) {
    engine::ForwardBatch step;
    for (int s = 0; s < 2; ++s) {
      if (t >= len[s]) continue;
      step.tokens.push_back(ids_[s * 1000 + t]);
      step.seq_ids.push_back(s);
      step.positions.push_back(t);
      step.logit_rows.push_back(static_cast<int32_t>(step.tokens.size()) - 1);
    }
    std::vector<float> a, b;
    ASSERT_TRUE(model_->Forward(step, **dense, &a).ok());
    ASSERT_TRUE(model_->Forward(step, **h2o, &b).ok());
    ASSERT_EQ(a, b) << "step " << t;
  }
  }
  // The same cache with a small budget does evict: the logits then differ.
  auto small = H2OCache::Create(cpu_, model_->config().num_layers, model_->config().num_heads, model_->config().head_dim(), 1,
                                {4, 4, 0});
  auto ref = offload::CreateKvCache(cpu_, engine::KvSpec(model_->config(), 1, 128));
  std::vector<float> a, b;
  for (int t = 0; t < 40; ++t) {
    engine::ForwardBatch step{{ids_[t]}, {0}, {t}, {0}};
    ASSERT_TRUE(model_->Forward(step, **ref, &a).ok());
    ASSERT_TRUE(model_->Forward(step, **small, &b).ok());
  }
  EXPECT_NE(a, b);
}

// `--kv cpu --h2o`: the evicting cache kept on the host gives the same logits as the one in backend
// memory (both computed on the CPU here), through a prefill of two prompts and decode steps that
// evict; only the call's q, k, v and the output cross.
TEST_F(H2OPerplexityTest, HostResidentH2OCacheGivesTheSameLogits) {
  for (const char* kv_name : {"f32", "f16", "q8", "q4"}) {
  SCOPED_TRACE(kv_name);
  const auto& c = model_->config();
  const KvType kv = *ParseKvType(kv_name, c.head_dim());
  const H2OOptions o{6, 6, 1};
  auto device = H2OCache::Create(cpu_, c.num_layers, c.num_heads, c.head_dim(), 2, o, kv);
  auto host = HostH2OCache::Create(c.num_layers, c.num_heads, c.head_dim(), 2, o, kv);
  ASSERT_TRUE(device.ok() && host.ok());
  engine::ForwardBatch pre;
  const int len[2] = {30, 21};
  for (int s = 0; s < 2; ++s) {
    for (int t = 0; t < len[s]; ++t) pre.tokens.push_back(ids_[s * 300 + t]), pre.seq_ids.push_back(s), pre.positions.push_back(t);
    pre.logit_rows.push_back(static_cast<int32_t>(pre.tokens.size()) - 1);
  }
  std::vector<float> a, b;
  ASSERT_TRUE(model_->Forward(pre, **device, &a).ok());
  ASSERT_TRUE(model_->Forward(pre, **host, &b).ok());
  EXPECT_EQ(a, b);
  for (int step = 0; step < 12; ++step) {
    engine::ForwardBatch dec{{ids_[30 + step], ids_[321 + step]}, {0, 1}, {len[0] + step, len[1] + step}, {0, 1}};
    ASSERT_TRUE(model_->Forward(dec, **device, &a).ok());
    ASSERT_TRUE(model_->Forward(dec, **host, &b).ok());
    ASSERT_EQ(a, b) << "step " << step;
  }
  EXPECT_EQ((*host)->slots().Held(2, 1, 3), (*device)->Held(2, 1, 3));
  }
}

// q8/q4 caches (dense, in backend memory and on the host): sized as planned, the host one gives
// the device one's logits bitwise, and each differs from the f32 cache's by its rounding only.
TEST_F(H2OPerplexityTest, QuantizedDenseCachesOnTheDeviceAndTheHostAgree) {
  const auto& c = model_->config();
  engine::ForwardBatch pre;
  for (int t = 0; t < 40; ++t) pre.tokens.push_back(ids_[t]), pre.seq_ids.push_back(0), pre.positions.push_back(t);
  for (int t = 0; t < 25; ++t) pre.tokens.push_back(ids_[300 + t]), pre.seq_ids.push_back(1), pre.positions.push_back(t);
  pre.logit_rows = {39, 64};
  auto run = [&](offload::AttentionCache& cache) {
    std::vector<float> all, logits;
    EXPECT_TRUE(model_->Forward(pre, cache, &logits).ok());
    all = logits;
    for (int step = 0; step < 6; ++step) {
      engine::ForwardBatch dec{{ids_[40 + step], ids_[325 + step]}, {0, 1}, {40 + step, 25 + step}, {0, 1}};
      EXPECT_TRUE(model_->Forward(dec, cache, &logits).ok());
      all.insert(all.end(), logits.begin(), logits.end());
    }
    return all;
  };
  auto f32 = offload::CreateKvCache(cpu_, engine::KvSpec(c, 2, 64));
  ASSERT_TRUE(f32.ok());
  const std::vector<float> exact = run(**f32);
  double err8 = 0, err4 = 0;
  for (const char* kv_name : {"q8", "q4"}) {
    SCOPED_TRACE(kv_name);
    const KvType kv = *ParseKvType(kv_name, c.head_dim());
    ASSERT_TRUE(kv.quant.has_value());
    offload::KvCacheSpec spec = engine::KvSpec(c, 2, 64, kv);
    const size_t dev_before = cpu_.allocated_bytes();
    auto dev = offload::CreateKvCache(cpu_, spec);
    ASSERT_TRUE(dev.ok()) << dev.status();
    EXPECT_EQ(cpu_.allocated_bytes() - dev_before, offload::KvCacheBytes(spec).device);
    // A quantized cache holds (bits / 32) of the f32 one's bytes, plus the fp16 group parameters.
    EXPECT_LT(offload::KvCacheBytes(spec).device, offload::KvCacheBytes(engine::KvSpec(c, 2, 64)).device / 2);
    spec.on_host = true;
    auto host = offload::CreateKvCache(cpu_, spec);
    ASSERT_TRUE(host.ok()) << host.status();
    const std::vector<float> a = run(**dev), b = run(**host);
    EXPECT_EQ(a, b);
    ASSERT_EQ(a.size(), exact.size());
    double& err = kv.quant->kind == QuantKind::kQ8 ? err8 : err4;
    err = ferry::testing::RelErr(a.data(), exact.data(), a.size());
  }
  EXPECT_GT(err8, 0.0);
  EXPECT_LT(err8, 2e-2);
  EXPECT_GT(err4, err8);
  RecordProperty("kv_q8_rel_err", std::to_string(err8));
  RecordProperty("kv_q4_rel_err", std::to_string(err4));
}

// A prompt in two chunks: the first is a prefill, the second (into a row that holds tokens) runs
// token by token, with the same logits bitwise as feeding its tokens one call at a time; two rows
// in one call, with evictions.
TEST_F(H2OPerplexityTest, ASecondChunkRunsTokenByToken) {
  const auto& c = model_->config();
  const H2OOptions o{6, 6, 1};
  auto chunked = H2OCache::Create(cpu_, c.num_layers, c.num_heads, c.head_dim(), 2, o);
  auto stepped = H2OCache::Create(cpu_, c.num_layers, c.num_heads, c.head_dim(), 2, o);
  ASSERT_TRUE(chunked.ok() && stepped.ok());
  engine::ForwardBatch pre;
  for (int s = 0; s < 2; ++s) {
    for (int t = 0; t < 20; ++t) pre.tokens.push_back(ids_[s * 300 + t]), pre.seq_ids.push_back(s), pre.positions.push_back(t);
    pre.logit_rows.push_back(static_cast<int32_t>(pre.tokens.size()) - 1);
  }
  std::vector<float> a, b;
  ASSERT_TRUE(model_->Forward(pre, **chunked, &a).ok());
  ASSERT_TRUE(model_->Forward(pre, **stepped, &b).ok());
  ASSERT_EQ(a, b);
  engine::ForwardBatch chunk;  // 9 more tokens for each row, interleaved
  for (int t = 20; t < 29; ++t) {
    for (int s = 0; s < 2; ++s) {
      chunk.tokens.push_back(ids_[s * 300 + t]), chunk.seq_ids.push_back(s), chunk.positions.push_back(t);
      chunk.logit_rows.push_back(static_cast<int32_t>(chunk.tokens.size()) - 1);
    }
  }
  ASSERT_TRUE(model_->Forward(chunk, **chunked, &a).ok());
  std::vector<float> want;
  for (int t = 20; t < 29; ++t) {
    engine::ForwardBatch step{{ids_[t], ids_[300 + t]}, {0, 1}, {t, t}, {0, 1}};
    ASSERT_TRUE(model_->Forward(step, **stepped, &b).ok());
    want.insert(want.end(), b.begin(), b.end());
  }
  EXPECT_EQ(a, want);
  EXPECT_EQ((*chunked)->Held(3, 1, 2), (*stepped)->Held(3, 1, 2));
}

TEST_F(H2OPerplexityTest, GenerationWithARoomyBudgetIsTheDenseGeneration) {
  engine::GenerateOptions o;
  o.max_new_tokens = 16;
  std::vector<engine::GenerationRequest> reqs = {{std::vector<int>(ids_.begin(), ids_.begin() + 40), 0},
                                                 {std::vector<int>(ids_.begin() + 100, ids_.begin() + 107), 1}};
  // F32 and F16 keys and values (with F16 the H2O prefill attends to the F16 values the dense cache holds).
  for (DType kv : {DType::kF32, DType::kF16}) {
    o.kv_dtype = kv;
    o.h2o.reset();
    auto dense = engine::Generate(*model_, reqs, o);
    o.h2o = H2OOptions{64, 64, 0};
    auto h2o = engine::Generate(*model_, reqs, o);
    ASSERT_TRUE(dense.ok() && h2o.ok()) << h2o.status();
    for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ((*dense)[i].tokens, (*h2o)[i].tokens) << DTypeName(kv);
  }
  o.kv_dtype = DType::kF32;
  o.h2o = H2OOptions{4, 4, 1};  // a tight budget still generates
  o.stop_at_eos = false;
  auto tight = engine::Generate(*model_, reqs, o);
  ASSERT_TRUE(tight.ok()) << tight.status();
  EXPECT_EQ((*tight)[0].tokens.size(), 16u);
}

TEST_F(H2OPerplexityTest, KjvValMatchesTheFloat64Reference) {
  EXPECT_NEAR(Ppl(std::nullopt), 45.87, 45.87 * 0.01);
  EXPECT_NEAR(Ppl(H2OOptions{51, 51, 0}), 47.50, 47.50 * 0.01);
  EXPECT_NEAR(Ppl(H2OOptions{0, 102, 0}), 51.78, 51.78 * 0.01);
}

// F16 keys and values (half the cache): perplexity moves by < 0.1% with the full cache, and H2O
// at 20% stays within 1% of the reference.
TEST_F(H2OPerplexityTest, F16KvCacheKeepsThePerplexity) {
  const double full32 = Ppl(std::nullopt), full16 = Ppl(std::nullopt, 4096, DType::kF16);
  EXPECT_NE(full16, full32);  // the values were rounded
  EXPECT_NEAR(full16, full32, full32 * 1e-3);
  EXPECT_NEAR(Ppl(H2OOptions{51, 51, 0}, 4096, DType::kF16), 47.50, 47.50 * 0.01);
}

}  // namespace
}  // namespace ferry::offload
