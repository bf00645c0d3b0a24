// The CPU backend's ops against plain double-precision loops on random inputs of odd shapes,
// batch invariance (bitwise), and bad arguments refused.
#include "kernels/cpu/cpu_backend.h"

#include <cmath>
#include <cstring>

#include "base/quant.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace ferry::kernels {
namespace {

using ferry::testing::RandomValues;

TensorView View(std::vector<float>& v, std::initializer_list<int64_t> shape) {
  return TensorView::Contiguous(v.data(), DType::kF32, shape);
}
TensorView Ids(std::vector<int32_t>& v) {
  return TensorView::Contiguous(v.data(), DType::kI32, {static_cast<int64_t>(v.size())});
}

double MaxRelErr(const std::vector<float>& got, const std::vector<double>& ref) {
  double diff = 0, mag = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::abs(got[i] - ref[i]));
    mag = std::max(mag, std::abs(ref[i]));
  }
  return diff / std::max(mag, 1e-30);
}

class LinearTest : public ::testing::TestWithParam<std::tuple<DType, int, int, int>> {};

TEST_P(LinearTest, MatchesDoubleReference) {
  const auto [dtype, n, m, k] = GetParam();
  CpuBackend cpu;
  std::vector<float> x = RandomValues(n * k, 1), w = RandomValues(m * k, 2), bias = RandomValues(m, 3);
  // Round the weights to the storage dtype so the reference sees what the kernel sees.
  std::vector<char> wstore(m * k * DTypeSize(dtype));
  ConvertFromF32(dtype, w.data(), wstore.data(), w.size());
  ConvertToF32(dtype, wstore.data(), w.data(), w.size());
  for (bool relu : {false, true}) {
    for (bool with_bias : {false, true}) {
      std::vector<float> y(n * m, NAN);  // poisoned: an unwritten element fails
      LinearArgs a{View(x, {n, k}), TensorView::Contiguous(wstore.data(), dtype, {m, k}),
                   with_bias ? View(bias, {m}) : TensorView{}, View(y, {n, m}), relu};
      ASSERT_TRUE(cpu.Linear(a).ok());
      std::vector<double> ref(n * m);
      for (int t = 0; t < n; ++t) {
        for (int o = 0; o < m; ++o) {
          double s = with_bias ? bias[o] : 0.0;
          for (int j = 0; j < k; ++j) s += static_cast<double>(x[t * k + j]) * w[o * k + j];
          ref[t * m + o] = relu ? std::max(0.0, s) : s;
        }
      }
      EXPECT_LT(MaxRelErr(y, ref), 1e-5) << "relu=" << relu << " bias=" << with_bias;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, LinearTest,
                         ::testing::Values(std::make_tuple(DType::kF32, 1, 1, 1), std::make_tuple(DType::kF32, 5, 7, 13),
                                           std::make_tuple(DType::kF16, 67, 33, 259),
                                           std::make_tuple(DType::kBF16, 130, 65, 64),
                                           std::make_tuple(DType::kF16, 3, 1031, 8)));

// Buffers of 2 MiB or more start on a 2 MiB boundary (so that the kernel can back them with huge
// pages: O_DIRECT reads into them ran about twice as fast on the dev VM), smaller host buffers on a
// page (O_DIRECT), and the budget counts the bytes asked, not the alignment: a budget of exactly
// two 3 MiB + 1 buffers holds both.
TEST(CpuBackendTest, LargeBuffersAreHugePageAlignedWithinTheBudget) {
  const size_t big = (size_t{3} << 20) + 1;
  CpuBackend cpu(CpuBackendOptions{2 * big, 2 * big});
  for (int host = 0; host < 2; ++host) {
    auto a = host ? cpu.AllocateHost(big) : cpu.Allocate(big);
    auto b = host ? cpu.AllocateHost(big) : cpu.Allocate(big);
    ASSERT_TRUE(a.ok() && b.ok()) << (a.ok() ? b.status() : a.status());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data()) % (size_t{2} << 20), 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b->data()) % (size_t{2} << 20), 0u);
    std::memset(a->data(), 7, big);  // every byte asked for is there
    EXPECT_FALSE((host ? cpu.AllocateHost(1) : cpu.Allocate(1)).ok());  // and the budget is spent
  }
  CpuBackend plain;
  auto small = plain.AllocateHost(5000);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small->data()) % 4096, 0u);
}

TEST(CpuBackendTest, LinearIsBatchInvariantBitwise) {
  CpuBackend cpu;
  const int n = 37, m = 71, k = 203;
  std::vector<float> x = RandomValues(n * k, 4), w = RandomValues(m * k, 5), bias = RandomValues(m, 6);
  std::vector<float> all(n * m);
  ASSERT_TRUE(cpu.Linear({View(x, {n, k}), View(w, {m, k}), View(bias, {m}), View(all, {n, m}), false}).ok());
  for (int t = 0; t < n; ++t) {
    std::vector<float> row(x.begin() + t * k, x.begin() + (t + 1) * k), out(m);
    ASSERT_TRUE(cpu.Linear({View(row, {1, k}), View(w, {m, k}), View(bias, {m}), View(out, {1, m}), false}).ok());
    ASSERT_EQ(std::memcmp(out.data(), all.data() + t * m, m * sizeof(float)), 0) << "row " << t;
  }
}

// A q4/q8 weight is dequantized inside the linear kernel: the result is the F32 linear of the
// dequantized matrix bit for bit (the same fp32 rows go through the same tile code), at every batch size (so still batch invariant), and a weight
// whose columns are not whole groups is refused.
TEST(CpuBackendTest, QuantizedLinearIsTheLinearOfTheDequantizedWeightsBitwise) {
  CpuBackend cpu;
  for (const QuantFormat f : {QuantFormat{QuantKind::kQ4, 64}, QuantFormat{QuantKind::kQ8, 32}}) {
    const int64_t m = 45, k = 192;
    std::vector<float> w = ferry::testing::RandomValues(static_cast<size_t>(m * k), 91), bias = ferry::testing::RandomValues(m, 92);
    auto layout = LayoutQuantized(f, m, k);
    ASSERT_TRUE(layout.ok());
    std::vector<uint8_t> q(layout->bytes);
    QuantizeRows(f, *layout, w.data(), m, k, q.data());
    std::vector<float> deq(w.size());
    DequantizeRows(f, *layout, q.data(), k, 0, m, deq.data());
    TensorView qv = TensorView::Contiguous(q.data(), DType::kU8, {m, k});
    qv.quant = f;
    for (int64_t n : {1, 5, 70}) {
      std::vector<float> x = ferry::testing::RandomValues(static_cast<size_t>(n * k), 93 + static_cast<uint32_t>(n));
      std::vector<float> got(static_cast<size_t>(n * m)), want(got.size());
      ASSERT_TRUE(cpu.Linear({View(x, {n, k}), qv, View(bias, {m}), View(got, {n, m}), false}).ok());
      ASSERT_TRUE(cpu.Linear({View(x, {n, k}), View(deq, {m, k}), View(bias, {m}), View(want, {n, m}), false}).ok());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << QuantFormatName(f) << " n=" << n;
    }
  }
  std::vector<uint8_t> q(4096);
  std::vector<float> x(10), y(3);
  TensorView bad = TensorView::Contiguous(q.data(), DType::kU8, {3, 10});
  bad.quant = QuantFormat{QuantKind::kQ4, 64};
  EXPECT_EQ(cpu.Linear({View(x, {1, 10}), bad, TensorView{}, View(y, {1, 3}), false}).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendTest, LayerNormMatchesReference) {
  CpuBackend cpu;
  const int n = 9, d = 77;
  std::vector<float> x = RandomValues(n * d, 7, 3.0f), g = RandomValues(d, 8), b = RandomValues(d, 9), y(n * d, NAN);
  ASSERT_TRUE(cpu.LayerNorm({View(x, {n, d}), View(g, {d}), View(b, {d}), View(y, {n, d}), 1e-5f}).ok());
  std::vector<double> ref(n * d);
  for (int i = 0; i < n; ++i) {
    double mean = 0, var = 0;
    for (int j = 0; j < d; ++j) mean += x[i * d + j];
    mean /= d;
    for (int j = 0; j < d; ++j) var += (x[i * d + j] - mean) * (x[i * d + j] - mean);
    var /= d;
    for (int j = 0; j < d; ++j) ref[i * d + j] = (x[i * d + j] - mean) / std::sqrt(var + 1e-5) * g[j] + b[j];
  }
  EXPECT_LT(MaxRelErr(y, ref), 1e-6);
}

TEST(CpuBackendTest, GatherRowsConvertsAndOffsets) {
  CpuBackend cpu;
  const int rows = 10, d = 6;
  std::vector<float> table = RandomValues(rows * d, 10);
  std::vector<uint16_t> half(table.size());
  ConvertFromF32(DType::kF16, table.data(), half.data(), table.size());
  std::vector<int32_t> ids = {3, 0, 7, 7};
  std::vector<float> out(ids.size() * d, NAN);
  GatherRowsArgs a{TensorView::Contiguous(half.data(), DType::kF16, {rows, d}), Ids(ids), 2,
                   View(out, {static_cast<int64_t>(ids.size()), d})};
  ASSERT_TRUE(cpu.GatherRows(a).ok());
  for (size_t i = 0; i < ids.size(); ++i) {
    for (int j = 0; j < d; ++j) EXPECT_EQ(out[i * d + j], F16ToF32(half[(ids[i] + 2) * d + j]));
  }
  ids[1] = 8;  // 8 + 2 is past the table
  EXPECT_EQ(cpu.GatherRows(a).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendTest, AttentionMatchesReferenceForMixedPrefillAndDecode) {
  CpuBackend cpu;
  const int seqs = 3, max_len = 19, heads = 3, hd = 10, w = heads * hd;
  std::vector<float> kc = RandomValues(seqs * max_len * w, 11), vc = RandomValues(seqs * max_len * w, 12);
  // Queries: a prefill of seq 1 (positions 0..6), a decode of seq 0 at 18, one of seq 2 at 4.
  std::vector<int32_t> seq = {1, 1, 1, 1, 1, 1, 1, 0, 2}, pos = {0, 1, 2, 3, 4, 5, 6, 18, 4};
  const int n = static_cast<int>(seq.size());
  std::vector<float> q = RandomValues(n * w, 13, 2.0f), out(n * w, NAN);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  AttentionArgs a{View(q, {n, w}), View(kc, {seqs, max_len, w}), View(vc, {seqs, max_len, w}), Ids(seq), Ids(pos),
                  View(out, {n, w}), heads, scale, TensorView{}};
  ASSERT_TRUE(cpu.Attention(a).ok());
  std::vector<double> ref(n * w), ref_cols(seqs * heads * max_len, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < heads; ++h) {
      std::vector<double> s(pos[i] + 1);
      double mx = -1e300, sum = 0;
      for (int j = 0; j <= pos[i]; ++j) {
        double dot = 0;
        for (int d = 0; d < hd; ++d) dot += q[i * w + h * hd + d] * static_cast<double>(kc[(seq[i] * max_len + j) * w + h * hd + d]);
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (int j = 0; j <= pos[i]; ++j) ref_cols[(seq[i] * heads + h) * max_len + j] += s[j] / sum;
      for (int d = 0; d < hd; ++d) {
        double acc = 0;
        for (int j = 0; j <= pos[i]; ++j) acc += s[j] / sum * vc[(seq[i] * max_len + j) * w + h * hd + d];
        ref[i * w + h * hd + d] = acc;
      }
    }
  }
  EXPECT_LT(MaxRelErr(out, ref), 1e-5);
  // The same pass with column sums (H2O's prefill scores): same output, sums of the probabilities.
  std::vector<float> out2(n * w, NAN), cols(seqs * heads * max_len, 0.0f);
  a.out = View(out2, {n, w});
  a.col_sums = TensorView::Contiguous(cols.data(), DType::kF32, {seqs, heads, max_len});
  ASSERT_TRUE(cpu.Attention(a).ok());
  EXPECT_EQ(out2, out);
  EXPECT_LT(MaxRelErr(cols, ref_cols), 1e-5);
  a.col_sums = TensorView{};
  pos[8] = max_len;  // outside the cache
  EXPECT_EQ(cpu.Attention(a).code(), absl::StatusCode::kInvalidArgument);
}

// An F16 KV cache (KvWrite rounds to nearest) attends exactly as an F32 cache holding the same
// rounded values: the same output and column sums, bitwise; likewise H2O's slots.
TEST(CpuBackendTest, F16KvCacheIsTheF32CacheOfRoundedValuesBitwise) {
  CpuBackend cpu;
  const int seqs = 3, max_len = 21, heads = 2, hd = 24, w = heads * hd;
  std::vector<int32_t> seq, pos;
  for (int p = 0; p < 17; ++p) seq.push_back(1), pos.push_back(p);  // a prompt
  seq.push_back(0), pos.push_back(0);
  seq.push_back(2), pos.push_back(0);
  const int n = static_cast<int>(seq.size());
  std::vector<float> k = RandomValues(n * w, 21, 3.0f), v = RandomValues(n * w, 22, 3.0f), q = RandomValues(n * w, 23);
  std::vector<float> k_r(k.size()), v_r(v.size());
  std::vector<uint16_t> tmp(k.size());
  for (auto [src, dst] : {std::pair{&k, &k_r}, std::pair{&v, &v_r}}) {
    ConvertFromF32(DType::kF16, src->data(), tmp.data(), tmp.size());
    ConvertToF32(DType::kF16, tmp.data(), dst->data(), tmp.size());
  }
  EXPECT_NE(k, k_r);  // the rounding did something
  std::vector<float> kc32(seqs * max_len * w, 0.0f), vc32(kc32.size(), 0.0f);
  std::vector<uint16_t> kc16(kc32.size(), 0), vc16(kc32.size(), 0);
  const TensorView k32 = View(kc32, {seqs, max_len, w}), v32 = View(vc32, {seqs, max_len, w});
  const TensorView k16 = TensorView::Contiguous(kc16.data(), DType::kF16, {seqs, max_len, w}),
                   v16 = TensorView::Contiguous(vc16.data(), DType::kF16, {seqs, max_len, w});
  ASSERT_TRUE(cpu.KvWrite({View(k_r, {n, w}), View(v_r, {n, w}), k32, v32, Ids(seq), Ids(pos)}).ok());
  ASSERT_TRUE(cpu.KvWrite({View(k, {n, w}), View(v, {n, w}), k16, v16, Ids(seq), Ids(pos)}).ok());
  const float scale = 0.2f;
  std::vector<float> out32(n * w, NAN), out16(n * w, NAN), cols32(seqs * heads * max_len, 0.0f), cols16(cols32.size(), 0.0f);
  ASSERT_TRUE(cpu.Attention({View(q, {n, w}), k32, v32, Ids(seq), Ids(pos), View(out32, {n, w}), heads, scale,
                             TensorView::Contiguous(cols32.data(), DType::kF32, {seqs, heads, max_len})})
                  .ok());
  ASSERT_TRUE(cpu.Attention({View(q, {n, w}), k16, v16, Ids(seq), Ids(pos), View(out16, {n, w}), heads, scale,
                             TensorView::Contiguous(cols16.data(), DType::kF32, {seqs, heads, max_len})})
                  .ok());
  EXPECT_EQ(out16, out32);
  EXPECT_EQ(cols16, cols32);

  // H2O slots: F32 and F16 tokens into F16 slots, F16 tokens into F32 slots (exact), then attention.
  const int slots = 5;
  std::vector<int32_t> sseq = {0, 2, 1}, slot_ids = {4, 0, 1, 3, 2, -1};  // [3 tokens, 2 heads]
  std::vector<float> s32(seqs * heads * slots * hd, 0.0f), t32(s32.size(), 0.0f);
  std::vector<uint16_t> s16(s32.size(), 0), t16(s32.size(), 0), k3(3 * w), v3(3 * w);
  ConvertFromF32(DType::kF16, k.data(), k3.data(), k3.size());
  ConvertFromF32(DType::kF16, v.data(), v3.data(), v3.size());
  const std::initializer_list<int64_t> sshape = {seqs, heads, slots, hd};
  auto f16 = [&](std::vector<uint16_t>& x, std::initializer_list<int64_t> shape) {
    return TensorView::Contiguous(x.data(), DType::kF16, shape);
  };
  std::vector<float> k3r(k_r.begin(), k_r.begin() + 3 * w), v3r(v_r.begin(), v_r.begin() + 3 * w), k3f(k.begin(), k.begin() + 3 * w),
      v3f(v.begin(), v.begin() + 3 * w);
  const TensorView slot_view = TensorView::Contiguous(slot_ids.data(), DType::kI32, {3, heads});
  ASSERT_TRUE(cpu.SlotKvWrite({View(k3r, {3, w}), View(v3r, {3, w}), View(s32, sshape), View(t32, sshape), Ids(sseq), slot_view}).ok());
  ASSERT_TRUE(cpu.SlotKvWrite({View(k3f, {3, w}), View(v3f, {3, w}), f16(s16, sshape), f16(t16, sshape), Ids(sseq), slot_view}).ok());
  std::vector<uint16_t> s16b(s16.size(), 0), t16b(s16.size(), 0);
  ASSERT_TRUE(cpu.SlotKvWrite({f16(k3, {3, w}), f16(v3, {3, w}), f16(s16b, sshape), f16(t16b, sshape), Ids(sseq), slot_view}).ok());
  EXPECT_EQ(s16b, s16);
  EXPECT_EQ(t16b, t16);
  std::vector<float> s32b(s32.size(), 0.0f), t32b(s32.size(), 0.0f);
  ASSERT_TRUE(cpu.SlotKvWrite({f16(k3, {3, w}), f16(v3, {3, w}), View(s32b, sshape), View(t32b, sshape), Ids(sseq), slot_view}).ok());
  EXPECT_EQ(s32b, s32);
  std::vector<uint8_t> occ(seqs * heads * slots, 0);
  for (int i = 0; i < 3; ++i) {
    for (int h = 0; h < heads; ++h) {
      if (slot_ids[i * heads + h] >= 0) occ[(sseq[i] * heads + h) * slots + slot_ids[i * heads + h]] = 1;
    }
  }
  std::vector<float> o32(3 * w, NAN), o16(3 * w, NAN), p32(3 * heads * slots, NAN), p16(p32.size(), NAN);
  const TensorView occ_view = TensorView::Contiguous(occ.data(), DType::kU8, {seqs, heads, slots});
  ASSERT_TRUE(cpu.SlotAttention({View(q, {3, w}), View(s32, sshape), View(t32, sshape), occ_view, Ids(sseq), View(o32, {3, w}),
                                 View(p32, {3, heads, slots}), scale})
                  .ok());
  ASSERT_TRUE(cpu.SlotAttention({View(q, {3, w}), f16(s16, sshape), f16(t16, sshape), occ_view, Ids(sseq), View(o16, {3, w}),
                                 View(p16, {3, heads, slots}), scale})
                  .ok());
  EXPECT_EQ(o16, o32);
  EXPECT_EQ(p16, p32);
  // BF16 is not a KV type.
  EXPECT_EQ(cpu.KvWrite({View(k, {n, w}), View(v, {n, w}), TensorView::Contiguous(kc16.data(), DType::kBF16, {seqs, max_len, w}),
                         TensorView::Contiguous(vc16.data(), DType::kBF16, {seqs, max_len, w}), Ids(seq), Ids(pos)})
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// q8/q4 KV caches (groups along head_dim): the dense cache and H2O's slots hold each token's
// quantization (QuantizeRows of its values), and attention over them is attention over the f32
// cache of the dequantized values, bit for bit (column sums and slot probabilities too).
TEST(CpuBackendTest, QuantizedKvCacheIsTheF32CacheOfDequantizedValuesBitwise) {
  CpuBackend cpu;
  const int seqs = 3, max_len = 21, heads = 2, hd = 32, w = heads * hd;
  std::vector<int32_t> seq, pos;
  for (int p = 0; p < 17; ++p) seq.push_back(1), pos.push_back(p);
  seq.push_back(0), pos.push_back(0);
  seq.push_back(2), pos.push_back(0);
  const int n = static_cast<int>(seq.size());
  std::vector<float> k = RandomValues(n * w, 31, 3.0f), v = RandomValues(n * w, 32, 3.0f), q = RandomValues(n * w, 33);
  for (const QuantFormat f : {QuantFormat{QuantKind::kQ8, 32}, QuantFormat{QuantKind::kQ4, 16}, QuantFormat{QuantKind::kQ8, 8}}) {
    SCOPED_TRACE(QuantFormatName(f));
    // The reference: each token's row quantized and dequantized on its own.
    auto token_layout = LayoutQuantized(f, n, w);
    ASSERT_TRUE(token_layout.ok());
    std::vector<uint8_t> tq(token_layout->bytes);
    std::vector<float> k_r(k.size()), v_r(v.size());
    for (auto [src, dst] : {std::pair{&k, &k_r}, std::pair{&v, &v_r}}) {
      QuantizeRows(f, *token_layout, src->data(), n, w, tq.data());
      DequantizeRows(f, *token_layout, tq.data(), w, 0, n, dst->data());
    }
    EXPECT_NE(k, k_r);
    auto layout = LayoutQuantized(f, seqs * max_len, w);
    ASSERT_TRUE(layout.ok());
    std::vector<uint8_t> kq(layout->bytes, 0), vq(layout->bytes, 0);
    auto quant = [&](std::vector<uint8_t>& x, std::initializer_list<int64_t> shape) {
      TensorView t = TensorView::Contiguous(x.data(), DType::kU8, shape);
      t.quant = f;
      return t;
    };
    std::vector<float> kc32(seqs * max_len * w, 0.0f), vc32(kc32.size(), 0.0f);
    const TensorView k32 = View(kc32, {seqs, max_len, w}), v32 = View(vc32, {seqs, max_len, w});
    ASSERT_TRUE(cpu.KvWrite({View(k_r, {n, w}), View(v_r, {n, w}), k32, v32, Ids(seq), Ids(pos)}).ok());
    const TensorView kqv = quant(kq, {seqs, max_len, w}), vqv = quant(vq, {seqs, max_len, w});
    ASSERT_TRUE(cpu.KvWrite({View(k, {n, w}), View(v, {n, w}), kqv, vqv, Ids(seq), Ids(pos)}).ok());
    const float scale = 0.2f;
    std::vector<float> out32(n * w, NAN), outq(n * w, NAN), cols32(seqs * heads * max_len, 0.0f), colsq(cols32.size(), 0.0f);
    ASSERT_TRUE(cpu.Attention({View(q, {n, w}), k32, v32, Ids(seq), Ids(pos), View(out32, {n, w}), heads, scale,
                               TensorView::Contiguous(cols32.data(), DType::kF32, {seqs, heads, max_len})})
                    .ok());
    ASSERT_TRUE(cpu.Attention({View(q, {n, w}), kqv, vqv, Ids(seq), Ids(pos), View(outq, {n, w}), heads, scale,
                               TensorView::Contiguous(colsq.data(), DType::kF32, {seqs, heads, max_len})})
                    .ok());
    EXPECT_EQ(outq, out32);
    EXPECT_EQ(colsq, cols32);

    // Slots: tokens (F32 and F16) into quantized slots, then slot attention.
    const int slots = 5;
    std::vector<int32_t> sseq = {0, 2, 1}, slot_ids = {4, 0, 1, 3, 2, -1};
    const std::initializer_list<int64_t> sshape = {seqs, heads, slots, hd};
    auto slayout = LayoutQuantized(f, seqs * heads * slots, hd);
    ASSERT_TRUE(slayout.ok());
    std::vector<uint8_t> sq(slayout->bytes, 0), tqs(slayout->bytes, 0);
    std::vector<float> s32(seqs * heads * slots * hd, 0.0f), t32(s32.size(), 0.0f);
    std::vector<float> k3(k.begin(), k.begin() + 3 * w), v3(v.begin(), v.begin() + 3 * w);
    std::vector<float> k3r(k_r.begin(), k_r.begin() + 3 * w), v3r(v_r.begin(), v_r.begin() + 3 * w);
    const TensorView slot_view = TensorView::Contiguous(slot_ids.data(), DType::kI32, {3, heads});
    ASSERT_TRUE(cpu.SlotKvWrite({View(k3r, {3, w}), View(v3r, {3, w}), View(s32, sshape), View(t32, sshape), Ids(sseq), slot_view}).ok());
    ASSERT_TRUE(cpu.SlotKvWrite({View(k3, {3, w}), View(v3, {3, w}), quant(sq, sshape), quant(tqs, sshape), Ids(sseq), slot_view}).ok());
    std::vector<uint8_t> occ(seqs * heads * slots, 0);
    for (int i = 0; i < 3; ++i) {
      for (int h = 0; h < heads; ++h) {
        if (slot_ids[i * heads + h] >= 0) occ[(sseq[i] * heads + h) * slots + slot_ids[i * heads + h]] = 1;
      }
    }
    std::vector<float> o32(3 * w, NAN), oq(3 * w, NAN), p32(3 * heads * slots, NAN), pq(p32.size(), NAN);
    const TensorView occ_view = TensorView::Contiguous(occ.data(), DType::kU8, {seqs, heads, slots});
    ASSERT_TRUE(cpu.SlotAttention({View(q, {3, w}), View(s32, sshape), View(t32, sshape), occ_view, Ids(sseq), View(o32, {3, w}),
                                   View(p32, {3, heads, slots}), scale})
                    .ok());
    ASSERT_TRUE(cpu.SlotAttention({View(q, {3, w}), quant(sq, sshape), quant(tqs, sshape), occ_view, Ids(sseq), View(oq, {3, w}),
                                   View(pq, {3, heads, slots}), scale})
                    .ok());
    EXPECT_EQ(oq, o32);
    EXPECT_EQ(pq, p32);
  }
  // A group that straddles heads (or does not divide the width) is refused.
  std::vector<uint8_t> big(1 << 16, 0);
  TensorView bad = TensorView::Contiguous(big.data(), DType::kU8, {seqs, max_len, w});
  bad.quant = QuantFormat{QuantKind::kQ8, 64};
  std::vector<float> out(n * w);
  EXPECT_EQ(cpu.Attention({View(q, {n, w}), bad, bad, Ids(seq), Ids(pos), View(out, {n, w}), heads, 0.2f, TensorView{}}).code(),
            absl::StatusCode::kInvalidArgument);
}

// Training ops against double-precision loops: every transpose combination of MatMul (with and
// without the bias rows), the BCE gradient over bit-packed labels, Adam.
TEST(CpuBackendTest, TrainingOpsMatchReferences) {
  CpuBackend cpu;
  const int m = 13, k = 37, n = 29;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (bool with_bias : {false, true}) {
        std::vector<float> a = RandomValues(m * k, 50), b = RandomValues(k * n, 51), bias = RandomValues(n, 52), out(m * n, NAN);
        std::vector<double> ref(m * n);
        for (int i = 0; i < m; ++i) {
          for (int j = 0; j < n; ++j) {
            double acc = with_bias ? bias[j] : 0.0;
            for (int x = 0; x < k; ++x) acc += static_cast<double>(ta ? a[x * m + i] : a[i * k + x]) * (tb ? b[j * k + x] : b[x * n + j]);
            ref[i * n + j] = acc;
          }
        }
        MatMulArgs args{ta ? View(a, {k, m}) : View(a, {m, k}), tb ? View(b, {n, k}) : View(b, {k, n}), View(out, {m, n}), ta, tb,
                        with_bias ? View(bias, {n}) : TensorView{}};
        ASSERT_TRUE(cpu.MatMul(args).ok());
        EXPECT_LT(MaxRelErr(out, ref), 1e-5) << ta << tb << with_bias;
      }
    }
  }
  std::vector<float> a = RandomValues(m * k, 53), b = RandomValues(k * n, 54), out(m * n);
  EXPECT_EQ(cpu.MatMul({View(a, {m, k}), View(b, {k, n}), View(out, {n, m}), false, false, TensorView{}}).code(),
            absl::StatusCode::kInvalidArgument);

  const int rows = 7, f = 21, row_bytes = 3;
  std::vector<float> z = RandomValues(rows * f, 55, 4.0f), g(rows * f, NAN), gb(f, NAN);
  std::vector<uint8_t> labels(rows * row_bytes);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<uint8_t>(i * 37 + 11);
  ASSERT_TRUE(cpu.BceGrad({View(z, {rows, f}), TensorView::Contiguous(labels.data(), DType::kU8, {rows, row_bytes}), View(g, {rows, f}),
                           View(gb, {f}), 3.0f, 0.6f})
                  .ok());
  std::vector<double> gref(rows * f), gbref(f, 0.0);
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < f; ++j) {
      const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(z[i * f + j])));
      const bool on = (labels[i * row_bytes + j / 8] >> (j % 8)) & 1;
      gref[i * f + j] = (on ? 3.0 * (s - 1.0) : 0.6 * s) / rows;
      gbref[j] += gref[i * f + j];
    }
  }
  EXPECT_LT(MaxRelErr(g, gref), 1e-5);
  EXPECT_LT(MaxRelErr(gb, gbref), 1e-5);

  std::vector<float> w = RandomValues(40, 56), grad = RandomValues(40, 57), mom = RandomValues(40, 58), var(40);
  for (size_t i = 0; i < var.size(); ++i) var[i] = 0.01f * (1.0f + i);
  std::vector<double> wref(40);
  const float c1 = 1.0f - std::pow(0.9f, 3.0f), c2 = 1.0f - std::pow(0.999f, 3.0f);
  for (int i = 0; i < 40; ++i) {
    const double mi = 0.9 * mom[i] + 0.1 * grad[i], vi = 0.999 * var[i] + 0.001 * grad[i] * grad[i];
    wref[i] = w[i] - 0.01 * (mi / c1) / (std::sqrt(vi / c2) + 1e-8);
  }
  ASSERT_TRUE(cpu.AdamStep({View(w, {40}), View(grad, {40}), View(mom, {40}), View(var, {40}), 0.01f, 0.9f, 0.999f, 1e-8f, c1, c2}).ok());
  EXPECT_LT(MaxRelErr(w, wref), 1e-6);
}

TEST(CpuBackendTest, KvWriteAndAdd) {
  CpuBackend cpu;
  const int seqs = 2, max_len = 4, w = 5;
  std::vector<float> kc(seqs * max_len * w, 0), vc(seqs * max_len * w, 0);
  std::vector<float> k = RandomValues(2 * w, 14), v = RandomValues(2 * w, 15);
  std::vector<int32_t> seq = {1, 0}, pos = {3, 2};
  ASSERT_TRUE(cpu.KvWrite({View(k, {2, w}), View(v, {2, w}), View(kc, {seqs, max_len, w}), View(vc, {seqs, max_len, w}),
                           Ids(seq), Ids(pos)})
                  .ok());
  EXPECT_EQ(kc[(1 * max_len + 3) * w + 4], k[4]);
  EXPECT_EQ(vc[(0 * max_len + 2) * w + 0], v[w]);
  seq[0] = 2;
  EXPECT_EQ(cpu.KvWrite({View(k, {2, w}), View(v, {2, w}), View(kc, {seqs, max_len, w}), View(vc, {seqs, max_len, w}),
                         Ids(seq), Ids(pos)})
                .code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<float> a = RandomValues(6, 16), b = RandomValues(6, 17), c(6);
  ASSERT_TRUE(cpu.Add(View(a, {2, 3}), View(b, {2, 3}), View(c, {2, 3})).ok());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c[i], a[i] + b[i]);
}

TEST(CpuBackendTest, ShapeMismatchesAreInvalidArgument) {
  CpuBackend cpu;
  std::vector<float> x(12), w(12), y(12);
  EXPECT_EQ(cpu.Linear({View(x, {3, 4}), View(w, {4, 3}), TensorView{}, View(y, {3, 4}), false}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cpu.Linear({View(x, {3, 4}), View(w, {3, 4}), TensorView{}, View(x, {3, 3}), false}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cpu.Add(View(x, {3, 4}), View(w, {4, 3}), View(y, {3, 4})).code(), absl::StatusCode::kInvalidArgument);
}

// With every neuron, in order, the bundled FFN is the dense FFN (Linear + ReLU, Linear) bit for bit:
// Deja Vu at k = 100% changes nothing.
TEST(CpuBackendTest, BundledFfnWithEveryNeuronIsTheDenseFfnBitwise) {
  CpuBackend cpu;
  const int n = 7, d = 40, F = 136;
  std::vector<float> x = RandomValues(n * d, 40), w1f = RandomValues(F * d, 41), b1f = RandomValues(F, 42),
                     w2f = RandomValues(d * F, 43), b2 = RandomValues(d, 44);
  std::vector<uint16_t> w1(w1f.size()), w2(w2f.size()), b1h(F);
  ConvertFromF32(DType::kF16, w1f.data(), w1.data(), w1.size());
  ConvertFromF32(DType::kF16, w2f.data(), w2.data(), w2.size());
  ConvertFromF32(DType::kF16, b1f.data(), b1h.data(), F);
  std::vector<float> b1(F);
  ConvertToF32(DType::kF16, b1h.data(), b1.data(), F);
  std::vector<uint16_t> bundles(static_cast<size_t>(F) * (2 * d + 1));
  for (int j = 0; j < F; ++j) {
    uint16_t* row = bundles.data() + static_cast<size_t>(j) * (2 * d + 1);
    for (int k = 0; k < d; ++k) row[k] = w1[j * d + k];
    row[d] = b1h[j];
    for (int k = 0; k < d; ++k) row[d + 1 + k] = w2[k * F + j];
  }
  std::vector<float> act(n * F), dense(n * d), sparse(n * d, NAN);
  ASSERT_TRUE(cpu.Linear({View(x, {n, d}), TensorView::Contiguous(w1.data(), DType::kF16, {F, d}), View(b1, {F}), View(act, {n, F}), true}).ok());
  ASSERT_TRUE(cpu.Linear({View(act, {n, F}), TensorView::Contiguous(w2.data(), DType::kF16, {d, F}), View(b2, {d}), View(dense, {n, d}), false}).ok());
  ASSERT_TRUE(cpu.BundledFfn({View(x, {n, d}), TensorView::Contiguous(bundles.data(), DType::kF16, {F, 2 * d + 1}), View(b2, {d}),
                              View(sparse, {n, d})})
                  .ok());
  EXPECT_EQ(sparse, dense);
  // Rows padded to a longer stride (the executor pads bundles to 16 bytes): the same result.
  const int stride = 2 * d + 8;
  std::vector<uint16_t> padded(static_cast<size_t>(F) * stride, 0x7e00);  // NaN padding: must not be read
  for (int j = 0; j < F; ++j) {
    std::copy_n(bundles.begin() + static_cast<size_t>(j) * (2 * d + 1), 2 * d + 1, padded.begin() + static_cast<size_t>(j) * stride);
  }
  std::vector<float> again(n * d, NAN);
  ASSERT_TRUE(cpu.BundledFfn({View(x, {n, d}), TensorView::Contiguous(padded.data(), DType::kF16, {F, stride}), View(b2, {d}),
                              View(again, {n, d})})
                  .ok());
  EXPECT_EQ(again, dense);
}

// Quantized bundles (a q4/q8 store's): with every neuron the bundled FFN is the dense F32 FFN of
// the bundles' dequantized values, bit for bit; over a subset, the dense FFN of those neurons.
TEST(CpuBackendTest, QuantizedBundledFfnIsTheDenseFfnOfItsDequantizedValues) {
  CpuBackend cpu;
  const int n = 6, d = 64, F = 96;
  for (const char* name : {"q4g64", "q8g32", "q4g16"}) {
    SCOPED_TRACE(name);
    const QuantFormat f = *ParseQuantFormatName(name);
    auto layout = LayoutQuantBundle(f, d);
    ASSERT_TRUE(layout.ok());
    EXPECT_EQ(layout->bytes % 16, 0u);
    std::vector<float> x = RandomValues(n * d, 70), vals = RandomValues(static_cast<size_t>(F) * 2 * d, 71), b1 = RandomValues(F, 72),
                       b2 = RandomValues(d, 73);
    std::vector<uint8_t> bundles(static_cast<size_t>(F) * layout->bytes, 0);
    std::vector<float> w1(F * d), w2(d * F), row(2 * d);
    for (int j = 0; j < F; ++j) {
      uint8_t* b = bundles.data() + static_cast<size_t>(j) * layout->bytes;
      QuantizeSpan(f, layout->row, vals.data() + static_cast<size_t>(j) * 2 * d, 2 * d, 0, 0, 2 * d, b);
      std::memcpy(b + layout->bias_offset, &b1[j], sizeof(float));
      DequantizeSpan(f, layout->row, b, 2 * d, 0, 0, 2 * d, row.data());
      for (int k = 0; k < d; ++k) w1[j * d + k] = row[k], w2[k * F + j] = row[d + k];
    }
    std::vector<float> act(n * F), dense(n * d), got(n * d, NAN);
    ASSERT_TRUE(cpu.Linear({View(x, {n, d}), View(w1, {F, d}), View(b1, {F}), View(act, {n, F}), true}).ok());
    ASSERT_TRUE(cpu.Linear({View(act, {n, F}), View(w2, {d, F}), View(b2, {d}), View(dense, {n, d}), false}).ok());
    TensorView qb = TensorView::Contiguous(bundles.data(), DType::kU8, {F, static_cast<int64_t>(layout->bytes)});
    qb.quant = f;
    ASSERT_TRUE(cpu.BundledFfn({View(x, {n, d}), qb, View(b2, {d}), View(got, {n, d})}).ok());
    EXPECT_EQ(got, dense);
    // Every third neuron: the dense FFN of those neurons (to fp32 rounding of the other sum order).
    std::vector<uint8_t> some;
    std::vector<int> keep;
    for (int j = 0; j < F; j += 3) {
      keep.push_back(j);
      some.insert(some.end(), bundles.begin() + static_cast<size_t>(j) * layout->bytes, bundles.begin() + static_cast<size_t>(j + 1) * layout->bytes);
    }
    TensorView sb = TensorView::Contiguous(some.data(), DType::kU8, {static_cast<int64_t>(keep.size()), static_cast<int64_t>(layout->bytes)});
    sb.quant = f;
    ASSERT_TRUE(cpu.BundledFfn({View(x, {n, d}), sb, View(b2, {d}), View(got, {n, d})}).ok());
    for (int t = 0; t < n; ++t) {
      for (int k = 0; k < d; ++k) {
        double ref = b2[k];
        for (int j : keep) {
          double h = b1[j];
          for (int i = 0; i < d; ++i) h += static_cast<double>(x[t * d + i]) * w1[j * d + i];
          ref += std::max(0.0, h) * w2[k * F + j];
        }
        EXPECT_NEAR(got[t * d + k], ref, 1e-4 * (1 + std::abs(ref)));
      }
    }
    // A stride that is not the bundle's size is refused.
    TensorView wrong = TensorView::Contiguous(bundles.data(), DType::kU8, {F - 1, static_cast<int64_t>(layout->bytes) + 16});
    wrong.quant = f;
    EXPECT_EQ(cpu.BundledFfn({View(x, {n, d}), wrong, View(b2, {d}), View(got, {n, d})}).code(), absl::StatusCode::kInvalidArgument);
  }
  // A group that does not divide d has no bundle layout.
  EXPECT_FALSE(LayoutQuantBundle(QuantFormat{QuantKind::kQ4, 48}, 64).ok());
}

// The bundled FFN over a neuron subset equals the dense FFN with the other neurons zeroed.
TEST(CpuBackendTest, BundledFfnEqualsTheDenseFfnRestrictedToTheSameNeurons) {
  CpuBackend cpu;
  const int n = 5, d = 24, F = 96;
  std::vector<float> x = RandomValues(n * d, 30), w1 = RandomValues(F * d, 31), b1 = RandomValues(F, 32),
                     w2 = RandomValues(d * F, 33), b2 = RandomValues(d, 34);
  std::vector<int> keep;
  for (int j = 0; j < F; ++j) {
    if ((j * 7) % 5 < 2) keep.push_back(j);  // 40% of the neurons, scattered
  }
  const int m = static_cast<int>(keep.size());
  for (DType dtype : {DType::kF32, DType::kF16}) {
    // Round weights to the bundle dtype so both sides see the same values.
    auto rounded = [&](std::vector<float> v) {
      std::vector<char> tmp(v.size() * DTypeSize(dtype));
      ConvertFromF32(dtype, v.data(), tmp.data(), v.size());
      ConvertToF32(dtype, tmp.data(), v.data(), v.size());
      return v;
    };
    const std::vector<float> rw1 = rounded(w1), rb1 = rounded(b1), rw2 = rounded(w2);
    std::vector<float> bundles_f(static_cast<size_t>(m) * (2 * d + 1));
    for (int i = 0; i < m; ++i) {
      float* row = bundles_f.data() + static_cast<size_t>(i) * (2 * d + 1);
      for (int k = 0; k < d; ++k) row[k] = rw1[keep[i] * d + k];
      row[d] = rb1[keep[i]];
      for (int k = 0; k < d; ++k) row[d + 1 + k] = rw2[k * F + keep[i]];
    }
    std::vector<char> bundles(bundles_f.size() * DTypeSize(dtype));
    ConvertFromF32(dtype, bundles_f.data(), bundles.data(), bundles_f.size());
    std::vector<float> out(n * d, NAN);
    ASSERT_TRUE(cpu.BundledFfn({View(x, {n, d}), TensorView::Contiguous(bundles.data(), dtype, {m, 2 * d + 1}),
                                View(b2, {d}), View(out, {n, d})})
                    .ok());
    std::vector<double> ref(n * d);
    for (int t = 0; t < n; ++t) {
      for (int k = 0; k < d; ++k) ref[t * d + k] = b2[k];
      for (int j : keep) {
        double h = rb1[j];
        for (int k = 0; k < d; ++k) h += static_cast<double>(x[t * d + k]) * rw1[j * d + k];
        h = std::max(0.0, h);
        for (int k = 0; k < d; ++k) ref[t * d + k] += h * rw2[k * F + j];
      }
    }
    EXPECT_LT(MaxRelErr(out, ref), 1e-5) << DTypeName(dtype);
  }
  std::vector<float> bad(10);
  EXPECT_EQ(cpu.BundledFfn({View(x, {n, d}), View(bad, {2, 5}), TensorView{}, View(x, {n, d})}).code(),
            absl::StatusCode::kInvalidArgument);
}

// BundledFfn keeps its scratch from call to call (grown to the largest call, not cleared): calls of
// growing, shrinking and growing sizes, rows and dtypes on one backend give what a fresh backend
// gives for each, bit for bit.
TEST(CpuBackendTest, BundledFfnScratchCarriesNothingFromCallToCall) {
  CpuBackend reused;
  const int d = 32;
  struct Call {
    int n, m;
    DType dtype;
  };
  int seed = 100;
  for (const Call& c : {Call{3, 200, DType::kF16}, Call{9, 17, DType::kF16}, Call{1, 5, DType::kF32}, Call{40, 260, DType::kF32},
                        Call{2, 64, DType::kF16}}) {
    SCOPED_TRACE(::testing::Message() << c.n << " x " << c.m << " " << DTypeName(c.dtype));
    std::vector<float> x = RandomValues(c.n * d, seed++), b2 = RandomValues(d, seed++),
                             vals = RandomValues(static_cast<size_t>(c.m) * (2 * d + 1), seed++);
    std::vector<char> bundles(vals.size() * DTypeSize(c.dtype));
    ConvertFromF32(c.dtype, vals.data(), bundles.data(), vals.size());
    const TensorView bv = TensorView::Contiguous(bundles.data(), c.dtype, {c.m, 2 * d + 1});
    std::vector<float> got(c.n * d, NAN), want(c.n * d, NAN);
    ASSERT_TRUE(reused.BundledFfn({View(x, {c.n, d}), bv, View(b2, {d}), View(got, {c.n, d})}).ok());
    CpuBackend fresh;
    ASSERT_TRUE(fresh.BundledFfn({View(x, {c.n, d}), bv, View(b2, {d}), View(want, {c.n, d})}).ok());
    EXPECT_EQ(got, want);
    EXPECT_TRUE(std::none_of(got.begin(), got.end(), [](float v) { return std::isnan(v); }));
  }
}

TEST(CpuBackendTest, ArgMaxRowsTakesTheLowestIndexAmongTies) {
  CpuBackend cpu;
  std::vector<float> logits = {0, 3, 3, 1, -1, -2, -1, -5};
  std::vector<int32_t> ids(2, -1);
  ASSERT_TRUE(cpu.ArgMaxRows(View(logits, {2, 4}), Ids(ids)).ok());
  EXPECT_EQ(ids, std::vector<int32_t>({1, 0}));
}

TEST(CpuBackendTest, AllocationsAreTracked) {
  CpuBackend cpu;
  {
    auto a = cpu.Allocate(1000);
    ASSERT_TRUE(a.ok());
    auto b = cpu.Allocate(24);
    EXPECT_EQ(cpu.allocated_bytes(), 1024u);
  }
  EXPECT_EQ(cpu.allocated_bytes(), 0u);
  EXPECT_EQ(cpu.peak_allocated_bytes(), 1024u);
}

}  // namespace
}  // namespace ferry::kernels
