// H2O with grouped-query attention against a naive per-step reference written here: a prefill of
// prompts (kept by column sums summed over each KV head's query heads), then decode steps in which
// every query head of a group attends to its KV head's slots, the slot's score grows by the sum of
// the group's probabilities, and the lowest-scoring evictable slot goes. Outputs and held positions
// are compared at every step, on the device-side cache (CPU backend) and the host-resident one.
#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "offload/h2o_cache.h"
#include "offload/host_kv_cache.h"
#include "test_util.h"

namespace ferry::offload {
namespace {

using ferry::testing::RandomValues;

constexpr int kHeads = 6, kKvHeads = 2, kGroup = kHeads / kKvHeads, kHd = 8, kRows = 2;
constexpr int kW = kHeads * kHd, kKw = kKvHeads * kHd;

struct Naive {
  H2OOptions o;
  // (row, kv head) -> position -> (score, key, value)
  struct Entry {
    double score = 0;
    std::vector<float> k, v;
  };
  std::map<std::pair<int, int>, std::map<int, Entry>> held;

  // Softmax of query q over `entries` (positions <= limit); returns the probabilities by position.
  static std::map<int, double> Probs(const std::map<int, Entry>& entries, const float* q, float scale, int limit) {
    std::map<int, double> s;
    double mx = -1e300;
    for (const auto& [p, e] : entries) {
      if (p > limit) continue;
      double dot = 0;
      for (int d = 0; d < kHd; ++d) dot += static_cast<double>(q[d]) * e.k[d];
      s[p] = dot * scale;
      mx = std::max(mx, s[p]);
    }
    double sum = 0;
    for (auto& [p, x] : s) sum += (x = std::exp(x - mx));
    for (auto& [p, x] : s) x /= sum;
    return s;
  }
  static void Output(const std::map<int, Entry>& entries, const std::map<int, double>& probs, float* out) {
    for (int d = 0; d < kHd; ++d) {
      double acc = 0;
      for (const auto& [p, pr] : probs) acc += pr * entries.at(p).v[d];
      out[d] = static_cast<float>(acc);
    }
  }
  // A prompt of `len` tokens into row r: q [len, kW], k/v [len, kKw].
  void Prefill(int r, int len, const float* q, const float* k, const float* v, float scale, float* out) {
    for (int g = 0; g < kKvHeads; ++g) {
      std::map<int, Entry> all;
      for (int p = 0; p < len; ++p) {
        all[p].k.assign(k + p * kKw + g * kHd, k + p * kKw + (g + 1) * kHd);
        all[p].v.assign(v + p * kKw + g * kHd, v + p * kKw + (g + 1) * kHd);
      }
      std::map<int, double> col;
      for (int p = 0; p < len; ++p) {
        for (int h = g * kGroup; h < (g + 1) * kGroup; ++h) {
          const auto pr = Probs(all, q + p * kW + h * kHd, scale, p);
          Output(all, pr, out + p * kW + h * kHd);
          for (const auto& [j, x] : pr) col[j] += x;
        }
      }
      std::vector<int> keep, rest;
      for (int p = 0; p < len; ++p) (p > len - 1 - o.recent || p < o.protect ? keep : rest).push_back(p);
      std::stable_sort(rest.begin(), rest.end(), [&](int a, int b) { return col[a] > col[b]; });
      const int heavy_left = o.heavy - std::min(o.protect, len);
      for (int i = 0; i < static_cast<int>(rest.size()) && i < heavy_left; ++i) keep.push_back(rest[i]);
      auto& h = held[{r, g}];
      h.clear();
      for (int p : keep) h[p] = {col[p], all[p].k, all[p].v};
    }
  }
  void Decode(int r, int pos, const float* q, const float* k, const float* v, float scale, float* out) {
    for (int g = 0; g < kKvHeads; ++g) {
      auto& h = held[{r, g}];
      h[pos] = {0.0, std::vector<float>(k + g * kHd, k + (g + 1) * kHd), std::vector<float>(v + g * kHd, v + (g + 1) * kHd)};
      std::map<int, double> sum;
      for (int qh = g * kGroup; qh < (g + 1) * kGroup; ++qh) {
        const auto pr = Probs(h, q + qh * kHd, scale, pos);
        Output(h, pr, out + qh * kHd);
        for (const auto& [j, x] : pr) sum[j] += x;
      }
      for (auto& [p, e] : h) e.score += sum[p];
      if (static_cast<int>(h.size()) <= o.heavy + o.recent) continue;
      int victim = -1;
      for (const auto& [p, e] : h) {
        if (p > pos - o.recent || p < o.protect) continue;
        if (victim < 0 || e.score < h[victim].score) victim = p;
      }
      h.erase(victim);
    }
  }
};

AttendArgs Args(std::vector<float>& q, std::vector<float>& k, std::vector<float>& v, std::vector<int32_t>& seq,
                std::vector<int32_t>& pos, std::vector<float>& out, float scale) {
  const int64_t n = static_cast<int64_t>(seq.size());
  AttendArgs a;
  a.q = TensorView::Contiguous(q.data(), DType::kF32, {n, kW});
  a.k = TensorView::Contiguous(k.data(), DType::kF32, {n, kKw});
  a.v = TensorView::Contiguous(v.data(), DType::kF32, {n, kKw});
  a.seq_ids = TensorView::Contiguous(seq.data(), DType::kI32, {n});
  a.positions = TensorView::Contiguous(pos.data(), DType::kI32, {n});
  a.host_seq_ids = &seq;
  a.host_positions = &pos;
  a.out = TensorView::Contiguous(out.data(), DType::kF32, {n, kW});
  a.num_heads = kHeads;
  a.num_kv_heads = kKvHeads;
  a.scale = scale;
  return a;
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-5) << what << " element " << i;
}

TEST(H2OGqaTest, MatchesTheNaiveRuleOverQueryGroups) {
  const H2OOptions opt{5, 3, 1};
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHd));
  for (bool host : {false, true}) {
    kernels::CpuBackend cpu;
    std::unique_ptr<AttentionCache> cache;
    if (host) {
      auto c = HostH2OCache::Create(1, kKvHeads, kHd, kRows, opt, DType::kF32, kHeads);
      ASSERT_TRUE(c.ok()) << c.status();
      cache = std::move(*c);
    } else {
      auto c = H2OCache::Create(cpu, 1, kKvHeads, kHd, kRows, opt, DType::kF32, kHeads);
      ASSERT_TRUE(c.ok()) << c.status();
      cache = std::move(*c);
    }
    const H2OCache& slots = host ? static_cast<HostH2OCache&>(*cache).slots() : static_cast<H2OCache&>(*cache);
    Naive naive{opt, {}};
    // Prefill: prompts of 14 and 9 tokens in one call.
    const int len[kRows] = {14, 9};
    std::vector<int32_t> seq, pos;
    for (int r = 0; r < kRows; ++r)
      for (int p = 0; p < len[r]; ++p) seq.push_back(r), pos.push_back(p);
    const int n = static_cast<int>(seq.size());
    std::vector<float> q = RandomValues(n * kW, 31, 2.0f), k = RandomValues(n * kKw, 32), v = RandomValues(n * kKw, 33), out(n * kW);
    ASSERT_TRUE(cache->Check(seq, pos).ok());
    ASSERT_TRUE(cache->Attend(cpu, Args(q, k, v, seq, pos, out, scale)).ok());
    std::vector<float> want(n * kW);
    for (int r = 0, at = 0; r < kRows; at += len[r], ++r) {
      naive.Prefill(r, len[r], q.data() + at * kW, k.data() + at * kKw, v.data() + at * kKw, scale, want.data() + at * kW);
    }
    ExpectNear(out, want, "prefill");
    // Decode steps, both rows each step.
    for (int step = 0; step < 20; ++step) {
      std::vector<int32_t> s = {0, 1}, p = {len[0] + step, len[1] + step};
      std::vector<float> dq = RandomValues(2 * kW, 100 + step, 2.0f), dk = RandomValues(2 * kKw, 200 + step),
                         dv = RandomValues(2 * kKw, 300 + step), dout(2 * kW), dwant(2 * kW);
      ASSERT_TRUE(cache->Check(s, p).ok());
      ASSERT_TRUE(cache->Attend(cpu, Args(dq, dk, dv, s, p, dout, scale)).ok());
      for (int r = 0; r < kRows; ++r) {
        naive.Decode(r, p[r], dq.data() + r * kW, dk.data() + r * kKw, dv.data() + r * kKw, scale, dwant.data() + r * kW);
      }
      ExpectNear(dout, dwant, "decode");
      for (int r = 0; r < kRows; ++r) {
        for (int g = 0; g < kKvHeads; ++g) {
          std::set<int> got, expect;
          for (int x : slots.Held(0, r, g)) {
            if (x >= 0) got.insert(x);
          }
          for (const auto& [x, e] : naive.held[{r, g}]) expect.insert(x);
          ASSERT_EQ(got, expect) << (host ? "host" : "device") << " step " << step << " row " << r << " kv head " << g;
        }
      }
    }
  }
}

TEST(H2OGqaTest, RefusesMismatchedHeads) {
  kernels::CpuBackend cpu;
  EXPECT_EQ(H2OCache::Create(cpu, 1, 4, 8, 1, {2, 2, 0}, DType::kF32, 6).status().code(), absl::StatusCode::kInvalidArgument);
  auto cache = H2OCache::Create(cpu, 1, kKvHeads, kHd, 1, {2, 2, 0}, DType::kF32, kHeads);
  ASSERT_TRUE(cache.ok());
  std::vector<int32_t> seq = {0}, pos = {0};
  std::vector<float> q(kW), k(kKw), v(kKw), out(kW);
  AttendArgs a = Args(q, k, v, seq, pos, out, 1.0f);
  a.num_kv_heads = 3;  // not the cache's
  EXPECT_EQ((*cache)->Attend(cpu, a).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::offload
