// CUDA twins of the Llama-family ops and of grouped-query attention, against the CPU backend on
// fresh random inputs of odd and large shapes: RMSNorm and its fused residual add, rotary
// embeddings (several tables, partial rotary, attention scaling, large positions), silu(gate) * up,
// dense attention with KV heads serving query groups (per-query and tensor-core prefill, column
// sums per query head), slot attention over KV-head slots, and H2O's update and prefill summing a
// group's probabilities; the fused q4/q8 linear. Skips without a GPU.
#include "base/quant.h"
#include "cuda_twin.h"

namespace ferry::kernels::cuda {
namespace {

using ferry::testing::RandomValues;

TensorView Hv(void* d, DType t, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d, t, sh); }

TEST_F(CudaTwinTest, RmsNormAndAddRmsNorm) {
  struct Case { int64_t n, dim; };
  for (const Case& c : {Case{7, 33}, Case{129, 4096}, Case{5, 12288}, Case{64 * 32, 128}, Case{3, 576}}) {
    std::vector<float> x = RandomValues(c.n * c.dim, 1, 3.0f), d = RandomValues(x.size(), 2), g = RandomValues(c.dim, 3),
                       ref(x.size());
    ASSERT_TRUE(cpu_.RmsNorm({Hv(x.data(), DType::kF32, {c.n, c.dim}), Hv(g.data(), DType::kF32, {c.dim}),
                              Hv(ref.data(), DType::kF32, {c.n, c.dim}), 1e-6f})
                    .ok());
    TensorView dx = Up(x, DType::kF32, {c.n, c.dim}), dg = Up(g, DType::kF32, {c.dim}), out = Poisoned({c.n, c.dim});
    ASSERT_TRUE(gpu_->RmsNorm({dx, dg, out, 1e-6f}).ok());
    EXPECT_LT(RelErr(Down(out), ref), 1e-5) << c.n << "x" << c.dim;
    // Fused: the residual is updated, then normalized in place.
    std::vector<float> res = x;
    ASSERT_TRUE(cpu_.AddRmsNorm({Hv(res.data(), DType::kF32, {c.n, c.dim}), Hv(d.data(), DType::kF32, {c.n, c.dim}),
                                 Hv(g.data(), DType::kF32, {c.dim}), Hv(ref.data(), DType::kF32, {c.n, c.dim}), 1e-5f})
                    .ok());
    TensorView dres = Up(x, DType::kF32, {c.n, c.dim});
    ASSERT_TRUE(gpu_->AddRmsNorm({dres, Up(d, DType::kF32, {c.n, c.dim}), dg, dres, 1e-5f}).ok());
    EXPECT_LT(RelErr(Down(dres), ref), 1e-5) << c.n << "x" << c.dim;
  }
}

TEST_F(CudaTwinTest, RopeAndSiluMul) {
  struct Case { int64_t n; int heads, hd, rotary, tables; };
  for (const Case& c : {Case{9, 3, 16, 16, 1}, Case{300, 32, 128, 128, 3}, Case{17, 5, 64, 32, 2}, Case{1, 8, 256, 256, 1}}) {
    const int64_t w = static_cast<int64_t>(c.heads) * c.hd, half = c.rotary / 2;
    std::vector<float> x = RandomValues(c.n * w, 5), freq = RandomValues(c.tables * half, 6);
    for (float& f : freq) f = std::abs(f);
    std::vector<int32_t> pos(c.n), rows(c.n);
    for (int64_t i = 0; i < c.n; ++i) pos[i] = static_cast<int32_t>((i * 7919) % 131072), rows[i] = static_cast<int32_t>(i % c.tables);
    std::vector<float> ref = x;
    RopeArgs h{Hv(ref.data(), DType::kF32, {c.n, w}), Hv(pos.data(), DType::kI32, {c.n}), Hv(freq.data(), DType::kF32, {c.tables, half}),
               Hv(rows.data(), DType::kI32, {c.n}), c.heads, c.rotary, 1.25f};
    ASSERT_TRUE(cpu_.Rope(h).ok());
    RopeArgs d{Up(x, DType::kF32, {c.n, w}), Up(pos, DType::kI32, {c.n}), Up(freq, DType::kF32, {c.tables, half}),
               Up(rows, DType::kI32, {c.n}), c.heads, c.rotary, 1.25f};
    ASSERT_TRUE(gpu_->Rope(d).ok());
    EXPECT_LT(RelErr(Down(d.x), ref), 1e-5) << c.n << " " << c.heads << "x" << c.hd << " rotary " << c.rotary;
    std::vector<float> g = RandomValues(c.n * w, 7, 6.0f), u = RandomValues(c.n * w, 8), sref(g.size());
    ASSERT_TRUE(cpu_.SiluMul({Hv(g.data(), DType::kF32, {c.n, w}), Hv(u.data(), DType::kF32, {c.n, w}),
                              Hv(sref.data(), DType::kF32, {c.n, w})})
                    .ok());
    TensorView dg = Up(g, DType::kF32, {c.n, w});
    ASSERT_TRUE(gpu_->SiluMul({dg, Up(u, DType::kF32, {c.n, w}), dg}).ok());
    EXPECT_LT(RelErr(Down(dg), sref), 1e-6);
  }
}

// Issue 15: the q4/q8 linear against the CPU's (which dequantizes into fp32 rows), on random
// weights and inputs, odd row counts, with bias and ReLU. Up to kFusedQuantRows rows the fused
// kernels (the vectorized one for power-of-two groups >= 8, 4 output rows per warp and chunks of
// 4 input rows, partial at m = 45, 33, 1000; the general one otherwise; fp32 accumulation in
// another order): 1e-5 relative. Above, the
// matrix dequantized to fp16 and the fp16 GEMM (activations rounded to fp16 too): 3e-3.
TEST_F(CudaTwinTest, QuantizedLinear) {
  struct Case { int64_t n, m, k; QuantFormat f; bool relu; };
  for (const Case& c : {Case{1, 45, 192, {QuantKind::kQ4, 64}, false}, Case{5, 4096, 4096, {QuantKind::kQ4, 64}, true},
                        Case{16, 1000, 640, {QuantKind::kQ8, 32}, false}, Case{37, 129, 256, {QuantKind::kQ4, 32}, false},
                        Case{3, 11008, 4096, {QuantKind::kQ8, 64}, false}, Case{64, 4096, 4096, {QuantKind::kQ4, 64}, true},
                        Case{17, 11008, 4096, {QuantKind::kQ8, 64}, false},
                        // The general kernel: a group that is not a power of two, columns not a multiple of 8.
                        Case{2, 33, 96, {QuantKind::kQ4, 6}, true}, Case{4, 20, 90, {QuantKind::kQ8, 10}, false}}) {
    std::vector<float> w = RandomValues(c.m * c.k, 11), x = RandomValues(c.n * c.k, 12), b = RandomValues(c.m, 13), ref(c.n * c.m);
    auto layout = LayoutQuantized(c.f, c.m, c.k);
    ASSERT_TRUE(layout.ok());
    std::vector<uint8_t> q(layout->bytes);
    QuantizeRows(c.f, *layout, w.data(), c.m, c.k, q.data());
    TensorView hq = Hv(q.data(), DType::kU8, {c.m, c.k});
    hq.quant = c.f;
    ASSERT_TRUE(cpu_.Linear({Hv(x.data(), DType::kF32, {c.n, c.k}), hq, Hv(b.data(), DType::kF32, {c.m}),
                             Hv(ref.data(), DType::kF32, {c.n, c.m}), c.relu})
                    .ok());
    TensorView dq = Up(q, DType::kU8, {c.m, c.k});
    dq.quant = c.f;
    TensorView out = Poisoned({c.n, c.m});
    ASSERT_TRUE(gpu_->Linear({Up(x, DType::kF32, {c.n, c.k}), dq, Up(b, DType::kF32, {c.m}), out, c.relu}).ok());
    const double tol = c.n <= kernels::kFusedQuantRows ? 1e-5 : 3e-3;
    EXPECT_LT(RelErr(Down(out), ref), tol) << QuantFormatName(c.f) << " " << c.n << "x" << c.k << " -> " << c.m;
  }
}

TEST_F(CudaTwinTest, GroupedQueryAttention) {
  struct Case { int heads, kv_heads, hd; };
  for (const Case& c : {Case{8, 2, 64}, Case{32, 8, 128}, Case{9, 3, 64}, Case{6, 1, 48}}) {
    const int w = c.heads * c.hd, kw = c.kv_heads * c.hd, seqs = 3, max_len = 260;
    std::vector<int32_t> seq, pos;
    for (int t = 0; t < 200; ++t) seq.push_back(0), pos.push_back(t);  // tiles and a tail
    for (int t = 0; t < 9; ++t) seq.push_back(1), pos.push_back(t);    // per query
    seq.push_back(2), pos.push_back(259);                               // a decode
    const int n = static_cast<int>(seq.size());
    std::vector<float> kc = RandomValues(static_cast<size_t>(seqs) * max_len * kw, 30), vc = RandomValues(kc.size(), 31),
                       q = RandomValues(static_cast<size_t>(n) * w, 32, 2.0f), ref(static_cast<size_t>(n) * w),
                       cols(static_cast<size_t>(seqs) * c.heads * max_len, 0.0f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    AttentionArgs h{Hv(q.data(), DType::kF32, {n, w}), Hv(kc.data(), DType::kF32, {seqs, max_len, kw}),
                    Hv(vc.data(), DType::kF32, {seqs, max_len, kw}), Hv(seq.data(), DType::kI32, {n}),
                    Hv(pos.data(), DType::kI32, {n}), Hv(ref.data(), DType::kF32, {n, w}), c.heads, scale,
                    Hv(cols.data(), DType::kF32, {seqs, c.heads, max_len})};
    h.num_kv_heads = c.kv_heads;
    ASSERT_TRUE(cpu_.Attention(h).ok());
    for (bool planned : {false, true}) {
      std::vector<float> zeros(cols.size(), 0.0f);
      AttentionArgs d{Up(q, DType::kF32, {n, w}), Up(kc, DType::kF32, {seqs, max_len, kw}), Up(vc, DType::kF32, {seqs, max_len, kw}),
                      Up(seq, DType::kI32, {n}), Up(pos, DType::kI32, {n}), Poisoned({n, w}), c.heads, scale,
                      Up(zeros, DType::kF32, {seqs, c.heads, max_len})};
      d.num_kv_heads = c.kv_heads;
      if (planned) d.host_seq_ids = seq.data(), d.host_positions = pos.data();
      ASSERT_TRUE(gpu_->Attention(d).ok());
      const double tol = planned ? 3e-3 : 1e-5;  // the tiles round to fp16
      EXPECT_LT(RelErr(Down(d.out), ref), tol) << c.heads << "/" << c.kv_heads << "x" << c.hd << " planned " << planned;
      EXPECT_LT(RelErr(Down(d.col_sums), cols), tol) << c.heads << "/" << c.kv_heads << " planned " << planned;
    }
  }
}

TEST_F(CudaTwinTest, GroupedQuerySlotsAndH2O) {
  const int seqs = 3, heads = 8, kv = 2, hd = 64, slots = 21, w = heads * hd;
  const size_t cells = static_cast<size_t>(seqs) * kv * slots;
  std::vector<float> ks = RandomValues(cells * hd, 40), vs = RandomValues(cells * hd, 41);
  std::vector<uint8_t> occ(cells);
  for (size_t i = 0; i < cells; ++i) occ[i] = (i * 7) % 5 != 0;
  std::vector<int32_t> seq = {2, 0, 1, 0};
  const int n = static_cast<int>(seq.size());
  std::vector<float> q = RandomValues(static_cast<size_t>(n) * w, 42, 2.0f), ref(static_cast<size_t>(n) * w),
                     probs(static_cast<size_t>(n) * heads * slots);
  SlotAttentionArgs h{Hv(q.data(), DType::kF32, {n, w}), Hv(ks.data(), DType::kF32, {seqs, kv, slots, hd}),
                      Hv(vs.data(), DType::kF32, {seqs, kv, slots, hd}), Hv(occ.data(), DType::kU8, {seqs, kv, slots}),
                      Hv(seq.data(), DType::kI32, {n}), Hv(ref.data(), DType::kF32, {n, w}),
                      Hv(probs.data(), DType::kF32, {n, heads, slots}), 0.125f};
  ASSERT_TRUE(cpu_.SlotAttention(h).ok());
  SlotAttentionArgs d{Up(q, DType::kF32, {n, w}), Up(ks, DType::kF32, {seqs, kv, slots, hd}), Up(vs, DType::kF32, {seqs, kv, slots, hd}),
                      Up(occ, DType::kU8, {seqs, kv, slots}), Up(seq, DType::kI32, {n}), Poisoned({n, w}),
                      Poisoned({n, heads, slots}), 0.125f};
  ASSERT_TRUE(gpu_->SlotAttention(d).ok());
  EXPECT_LT(RelErr(Down(d.out), ref), 1e-5);
  EXPECT_LT(RelErr(Down(d.probs), probs), 1e-5);

  // H2OUpdate with the group's probabilities summed; one token per row.
  std::vector<int32_t> useq = {0, 1, 2}, at = {40, 41, 42}, slot_pos(cells);
  for (size_t i = 0; i < cells; ++i) slot_pos[i] = occ[i] ? static_cast<int32_t>(i % 40) : -1;
  std::vector<float> scores = RandomValues(cells, 43), up = RandomValues(3 * heads * slots, 44);
  for (float& x : up) x = std::abs(x);
  std::vector<int32_t> cpos = slot_pos;
  std::vector<float> cscore = scores;
  std::vector<uint8_t> cocc = occ;
  ASSERT_TRUE(cpu_.H2OUpdate({Hv(useq.data(), DType::kI32, {3}), Hv(at.data(), DType::kI32, {3}), Hv(up.data(), DType::kF32, {3, heads, slots}),
                              Hv(cpos.data(), DType::kI32, {seqs, kv, slots}), Hv(cscore.data(), DType::kF32, {seqs, kv, slots}),
                              Hv(cocc.data(), DType::kU8, {seqs, kv, slots}), 10, 3, 1})
                  .ok());
  TensorView dpos = Up(slot_pos, DType::kI32, {seqs, kv, slots}), dscore = Up(scores, DType::kF32, {seqs, kv, slots}),
             docc = Up(occ, DType::kU8, {seqs, kv, slots});
  ASSERT_TRUE(gpu_->H2OUpdate({Up(useq, DType::kI32, {3}), Up(at, DType::kI32, {3}), Up(up, DType::kF32, {3, heads, slots}), dpos, dscore,
                               docc, 10, 3, 1})
                  .ok());
  EXPECT_EQ(Down(dscore), cscore);  // the same sums in the same order
  std::vector<int32_t> gpos(cells);
  ASSERT_TRUE(gpu_->CopyToHost(gpos.data(), dpos.data, cells * sizeof(int32_t)).ok());
  EXPECT_EQ(gpos, cpos);

  // H2OPrefill from per-query-head column sums.
  const int used = 2, max_len = 30;
  std::vector<float> col = RandomValues(static_cast<size_t>(used) * heads * max_len, 45);
  for (float& x : col) x = std::abs(x);
  std::vector<int32_t> lengths = {30, 17}, rows = {2, 0}, token_slot(static_cast<size_t>(used) * max_len * kv);
  std::vector<int32_t> ppos(cells, -1);
  std::vector<float> pscore(cells, 0.0f);
  std::vector<uint8_t> pocc(cells, 0);
  ASSERT_TRUE(cpu_.H2OPrefill({Hv(col.data(), DType::kF32, {used, heads, max_len}), Hv(lengths.data(), DType::kI32, {used}),
                               Hv(rows.data(), DType::kI32, {used}), Hv(ppos.data(), DType::kI32, {seqs, kv, slots}),
                               Hv(pscore.data(), DType::kF32, {seqs, kv, slots}), Hv(pocc.data(), DType::kU8, {seqs, kv, slots}),
                               Hv(token_slot.data(), DType::kI32, {used * max_len, kv}), 12, 6, 2})
                  .ok());
  std::vector<int32_t> neg(cells, -1), ts_poison(token_slot.size(), -9);
  std::vector<float> zero(cells, 0.0f);
  std::vector<uint8_t> zocc(cells, 0);
  H2OPrefillArgs dp{Up(col, DType::kF32, {used, heads, max_len}), Up(lengths, DType::kI32, {used}), Up(rows, DType::kI32, {used}),
                    Up(neg, DType::kI32, {seqs, kv, slots}), Up(zero, DType::kF32, {seqs, kv, slots}), Up(zocc, DType::kU8, {seqs, kv, slots}),
                    Up(ts_poison, DType::kI32, {used * max_len, kv}), 12, 6, 2};
  ASSERT_TRUE(gpu_->H2OPrefill(dp).ok());
  std::vector<int32_t> gts(token_slot.size()), gp(cells);
  ASSERT_TRUE(gpu_->CopyToHost(gts.data(), dp.token_slot.data, gts.size() * sizeof(int32_t)).ok());
  ASSERT_TRUE(gpu_->CopyToHost(gp.data(), dp.slot_pos.data, cells * sizeof(int32_t)).ok());
  EXPECT_EQ(gts, token_slot);
  EXPECT_EQ(gp, ppos);
  EXPECT_EQ(Down(dp.scores), pscore);
}

}  // namespace
}  // namespace ferry::kernels::cuda
