// Every CUDA op against its CPU twin on fresh random inputs of odd and large shapes, outputs
// poisoned with NaN before the run so an unwritten element fails. Tolerances by dtype, relative to
// the output's largest magnitude: fp32 paths 1e-5; GEMMs with split (hi + lo) activations 1e-5
// (fp16) and 1e-4 (bf16), with activations rounded to fp16 (bf16) 2e-3 (1.6e-2); tensor-core
// prefill attention (Q, K, V and P in fp16, fp32 accumulation) 3e-3. Skips (GTEST_SKIP) where no GPU is visible, as on CI machines.
#include <cmath>
#include <cstring>

#include "cuda_twin.h"

namespace ferry::kernels::cuda {
namespace {

using ferry::testing::RandomValues;

TEST_F(CudaTwinTest, Linear) {
  struct Case { DType dtype; int n, m, k; bool relu; double tol; };
  // Up to 128 rows (split_gemm_max_rows) the activations go in as hi + lo 16-bit terms: about fp32
  // accuracy (2^-22 relative for fp16, 2^-16 for bf16); above, rounded to the weight type.
  for (const Case& c : {Case{DType::kF32, 1, 1, 1, false, 1e-5}, Case{DType::kF32, 7, 33, 129, true, 1e-5},
                        Case{DType::kF16, 1, 4097, 4096, false, 1e-5}, Case{DType::kF16, 67, 1031, 259, true, 1e-5},
                        Case{DType::kF16, 128, 1031, 259, false, 1e-5}, Case{DType::kF16, 129, 1031, 259, false, 2e-3},
                        Case{DType::kF16, 512, 16384, 4096, true, 2e-3}, Case{DType::kBF16, 13, 515, 777, false, 1e-4},
                        Case{DType::kBF16, 300, 515, 777, true, 1.6e-2}}) {
    std::vector<float> x = RandomValues(static_cast<size_t>(c.n) * c.k, 1), w = RandomValues(static_cast<size_t>(c.m) * c.k, 2),
                       bias = RandomValues(c.m, 3);
    std::vector<char> wstore(static_cast<size_t>(c.m) * c.k * DTypeSize(c.dtype));
    ConvertFromF32(c.dtype, w.data(), wstore.data(), w.size());
    std::vector<float> ref(static_cast<size_t>(c.n) * c.m);
    LinearArgs host{TensorView::Contiguous(x.data(), DType::kF32, {c.n, c.k}),
                    TensorView::Contiguous(wstore.data(), c.dtype, {c.m, c.k}),
                    TensorView::Contiguous(bias.data(), DType::kF32, {c.m}),
                    TensorView::Contiguous(ref.data(), DType::kF32, {c.n, c.m}), c.relu};
    ASSERT_TRUE(cpu_.Linear(host).ok());
    LinearArgs dev{Up(x, DType::kF32, {c.n, c.k}), Up(wstore, c.dtype, {c.m, c.k}), Up(bias, DType::kF32, {c.m}),
                   Poisoned({c.n, c.m}), c.relu};
    // Above 128 rows, 16-bit weights go through cuBLASLt with bias and ReLU in the epilogue; the
    // aligned shapes must (odd ones may fall back to cublasGemmEx + a bias/ReLU pass). Both ways
    // are checked against the CPU.
    for (bool epilogue : {true, false}) {
      gpu_->set_gemm_epilogue(epilogue);
      const int64_t lt_before = gpu_->lt_gemm_calls(), fallbacks_before = gpu_->lt_gemm_fallbacks();
      ASSERT_TRUE(gpu_->Linear(dev).ok());
      EXPECT_LT(RelErr(Down(dev.out), ref), c.tol)
          << DTypeName(c.dtype) << " " << c.n << "x" << c.m << "x" << c.k << " epilogue " << epilogue;
      const bool lt = epilogue && c.dtype != DType::kF32 && c.n > 128;
      EXPECT_EQ(gpu_->lt_gemm_calls() - lt_before + gpu_->lt_gemm_fallbacks() - fallbacks_before, lt ? 1 : 0);
      if (lt && c.m % 8 == 0 && c.k % 8 == 0) {
        EXPECT_EQ(gpu_->lt_gemm_calls() - lt_before, 1) << "cuBLASLt fell back";
      }
      if (lt) {
        std::printf("%s %dx%dx%d: %s\n", DTypeName(c.dtype), c.n, c.m, c.k,
                    gpu_->lt_gemm_calls() > lt_before ? "cuBLASLt epilogue" : "fallback (no cuBLASLt algorithm)");
      }
      std::vector<float> nan(ref.size(), NAN);
      ASSERT_TRUE(gpu_->CopyToDevice(dev.out.data, nan.data(), dev.out.bytes()).ok());
    }
    gpu_->set_gemm_epilogue(true);
  }
}

TEST_F(CudaTwinTest, GemmWorkspaceIsInsideTheBudget) {
  auto none = CudaBackend::Create();
  ASSERT_TRUE(none.ok());
  EXPECT_EQ((*none)->reserved_device_bytes(), size_t{32} << 20);
  EXPECT_EQ((*none)->allocated_bytes(), size_t{32} << 20);
  // A small budget gets 1/16 of it as workspace, and large GEMMs still run (and match the CPU).
  CudaBackendOptions o;
  o.memory_budget_bytes = size_t{48} << 20;
  auto small = CudaBackend::Create(o);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ((*small)->reserved_device_bytes(), size_t{3} << 20);
  const int n = 256, m = 1024, k = 2048;
  std::vector<float> x = RandomValues(static_cast<size_t>(n) * k, 11), w = RandomValues(static_cast<size_t>(m) * k, 12),
                     bias = RandomValues(m, 13), ref(static_cast<size_t>(n) * m), got(ref.size());
  std::vector<uint16_t> wh(w.size());
  ConvertFromF32(DType::kF16, w.data(), wh.data(), w.size());
  ASSERT_TRUE(cpu_.Linear({TensorView::Contiguous(x.data(), DType::kF32, {n, k}), TensorView::Contiguous(wh.data(), DType::kF16, {m, k}),
                           TensorView::Contiguous(bias.data(), DType::kF32, {m}), TensorView::Contiguous(ref.data(), DType::kF32, {n, m}),
                           true})
                  .ok());
  CudaBackend& g = **small;
  auto bx = g.Allocate(x.size() * 4), bw = g.Allocate(wh.size() * 2), bb = g.Allocate(m * 4), by = g.Allocate(ref.size() * 4);
  ASSERT_TRUE(bx.ok() && bw.ok() && bb.ok() && by.ok());
  ASSERT_TRUE(g.CopyToDevice(bx->data(), x.data(), x.size() * 4).ok());
  ASSERT_TRUE(g.CopyToDevice(bw->data(), wh.data(), wh.size() * 2).ok());
  ASSERT_TRUE(g.CopyToDevice(bb->data(), bias.data(), m * 4).ok());
  ASSERT_TRUE(g.Linear({TensorView::Contiguous(bx->data(), DType::kF32, {n, k}, Device::kCuda),
                        TensorView::Contiguous(bw->data(), DType::kF16, {m, k}, Device::kCuda),
                        TensorView::Contiguous(bb->data(), DType::kF32, {m}, Device::kCuda),
                        TensorView::Contiguous(by->data(), DType::kF32, {n, m}, Device::kCuda), true})
                  .ok());
  ASSERT_TRUE(g.CopyToHost(got.data(), by->data(), got.size() * 4).ok());
  EXPECT_LT(RelErr(got, ref), 2e-3);
  EXPECT_EQ(g.lt_gemm_calls(), 1);
  EXPECT_LE(g.peak_allocated_bytes(), o.memory_budget_bytes);
}

TEST_F(CudaTwinTest, GatherLayerNormAdd) {
  for (auto [rows, dim] : {std::pair<int, int>{1, 1}, {37, 255}, {300, 4096}, {5, 12288}, {3, 5000}, {2, 20000}}) {
    std::vector<float> x = RandomValues(static_cast<size_t>(rows) * dim, 4, 3.0f), g = RandomValues(dim, 5),
                       b = RandomValues(dim, 6), y(x.size()), sum(x.size());
    ASSERT_TRUE(cpu_.LayerNorm({TensorView::Contiguous(x.data(), DType::kF32, {rows, dim}),
                                TensorView::Contiguous(g.data(), DType::kF32, {dim}),
                                TensorView::Contiguous(b.data(), DType::kF32, {dim}),
                                TensorView::Contiguous(y.data(), DType::kF32, {rows, dim}), 1e-5f})
                    .ok());
    LayerNormArgs dev{Up(x, DType::kF32, {rows, dim}), Up(g, DType::kF32, {dim}), Up(b, DType::kF32, {dim}),
                      Poisoned({rows, dim}), 1e-5f};
    ASSERT_TRUE(gpu_->LayerNorm(dev).ok());
    EXPECT_LT(RelErr(Down(dev.out), y), 1e-5) << rows << "x" << dim;

    TensorView out = Poisoned({rows, dim});
    ASSERT_TRUE(gpu_->Add(dev.in, dev.out, out).ok());
    for (size_t i = 0; i < x.size(); ++i) sum[i] = x[i] + y[i];
    EXPECT_LT(RelErr(Down(out), sum), 1e-6);

    // Residual add fused with LayerNorm: residual = x + y (updated in place), out = LN(residual);
    // then the post-LN form with out aliasing the residual.
    std::vector<float> ln_sum(x.size());
    ASSERT_TRUE(cpu_.LayerNorm({TensorView::Contiguous(sum.data(), DType::kF32, {rows, dim}),
                                TensorView::Contiguous(g.data(), DType::kF32, {dim}),
                                TensorView::Contiguous(b.data(), DType::kF32, {dim}),
                                TensorView::Contiguous(ln_sum.data(), DType::kF32, {rows, dim}), 1e-5f})
                    .ok());
    TensorView residual = Up(x, DType::kF32, {rows, dim}), fused = Poisoned({rows, dim}), delta = Up(y, DType::kF32, {rows, dim});
    ASSERT_TRUE(gpu_->AddLayerNorm({residual, delta, dev.gamma, dev.beta, fused, 1e-5f}).ok());
    EXPECT_LT(RelErr(Down(residual), sum), 1e-6) << rows << "x" << dim;
    EXPECT_LT(RelErr(Down(fused), ln_sum), 1e-5) << rows << "x" << dim;
    TensorView in_place = Up(x, DType::kF32, {rows, dim});
    ASSERT_TRUE(gpu_->AddLayerNorm({in_place, delta, dev.gamma, dev.beta, in_place, 1e-5f}).ok());
    EXPECT_LT(RelErr(Down(in_place), ln_sum), 1e-5) << "in place " << rows << "x" << dim;
  }
  const int vocab = 1003, dim = 333;
  std::vector<float> table = RandomValues(static_cast<size_t>(vocab) * dim, 7);
  std::vector<uint16_t> half(table.size());
  ConvertFromF32(DType::kF16, table.data(), half.data(), half.size());
  std::vector<int32_t> ids = {0, 1000, 5, 5, 998, 17};
  std::vector<float> ref(ids.size() * dim);
  GatherRowsArgs host{TensorView::Contiguous(half.data(), DType::kF16, {vocab, dim}),
                      TensorView::Contiguous(ids.data(), DType::kI32, {6}), 2,
                      TensorView::Contiguous(ref.data(), DType::kF32, {6, dim})};
  ASSERT_TRUE(cpu_.GatherRows(host).ok());
  GatherRowsArgs dev{Up(half, DType::kF16, {vocab, dim}), Up(ids, DType::kI32, {6}), 2, Poisoned({6, dim})};
  ASSERT_TRUE(gpu_->GatherRows(dev).ok());
  EXPECT_EQ(Down(dev.out), ref);
}

// Mixed prefill and decode queries over sequences of different lengths, then the same cache read
// by OPT-6.7B-shaped decode attention (32 heads x 128) at context 2048.
TEST_F(CudaTwinTest, KvWriteAndAttention) {
  struct Case { int seqs, max_len, heads, hd; };
  for (const Case& c : {Case{3, 19, 3, 10}, Case{4, 600, 8, 32}, Case{2, 2048, 32, 128}, Case{1, 70, 2, 256}}) {
    const int w = c.heads * c.hd;
    std::vector<int32_t> seq, pos;
    for (int t = 0; t < std::min(c.max_len, 300); ++t) seq.push_back(0), pos.push_back(t);  // prefill of seq 0
    for (int s = 1; s < c.seqs; ++s) seq.push_back(s), pos.push_back(c.max_len - s);         // decodes
    const int n = static_cast<int>(seq.size());
    std::vector<float> kc = RandomValues(static_cast<size_t>(c.seqs) * c.max_len * w, 8),
                       vc = RandomValues(kc.size(), 9), q = RandomValues(static_cast<size_t>(n) * w, 10, 2.0f),
                       k = RandomValues(static_cast<size_t>(n) * w, 11), v = RandomValues(static_cast<size_t>(n) * w, 12),
                       ref(static_cast<size_t>(n) * w);
    auto host_view = [](std::vector<float>& d, std::initializer_list<int64_t> s) {
      return TensorView::Contiguous(d.data(), DType::kF32, s);
    };
    TensorView hseq = TensorView::Contiguous(seq.data(), DType::kI32, {n});
    TensorView hpos = TensorView::Contiguous(pos.data(), DType::kI32, {n});
    ASSERT_TRUE(cpu_.KvWrite({host_view(k, {n, w}), host_view(v, {n, w}), host_view(kc, {c.seqs, c.max_len, w}),
                              host_view(vc, {c.seqs, c.max_len, w}), hseq, hpos})
                    .ok());
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    ASSERT_TRUE(cpu_.Attention({host_view(q, {n, w}), host_view(kc, {c.seqs, c.max_len, w}),
                                host_view(vc, {c.seqs, c.max_len, w}), hseq, hpos, host_view(ref, {n, w}), c.heads, scale, TensorView{}})
                    .ok());
    // The device starts from the cache as it was before the CPU's write.
    std::vector<float> kc0 = RandomValues(kc.size(), 8), vc0 = RandomValues(vc.size(), 9);
    TensorView dk = Up(kc0, DType::kF32, {c.seqs, c.max_len, w}), dv = Up(vc0, DType::kF32, {c.seqs, c.max_len, w});
    TensorView dseq = Up(seq, DType::kI32, {n}), dpos = Up(pos, DType::kI32, {n});
    ASSERT_TRUE(gpu_->KvWrite({Up(k, DType::kF32, {n, w}), Up(v, DType::kF32, {n, w}), dk, dv, dseq, dpos}).ok());
    EXPECT_EQ(Down(dk), kc);
    EXPECT_EQ(Down(dv), vc);
    AttentionArgs dev{Up(q, DType::kF32, {n, w}), dk, dv, dseq, dpos, Poisoned({n, w}), c.heads, scale, TensorView{}};
    ASSERT_TRUE(gpu_->Attention(dev).ok());
    EXPECT_LT(RelErr(Down(dev.out), ref), 1e-5) << c.seqs << " " << c.max_len << " " << c.heads << "x" << c.hd;
  }
}

// The tensor-core prefill: runs of one sequence at consecutive positions (full 64-query tiles, a
// partial tile, a 16-query tile, shorter runs left to the per-query kernel), mixed with decodes,
// with and without H2O's column sums; against the CPU and against the fp32 per-query kernel.
TEST_F(CudaTwinTest, TensorCorePrefillAttentionAndColumnSums) {
  struct Case { int heads, hd; };
  for (const Case& c : {Case{4, 64}, Case{32, 128}, Case{3, 16}}) {
    const int w = c.heads * c.hd, seqs = 5, max_len = 400;
    std::vector<int32_t> seq, pos;
    auto prompt = [&](int s, int from, int len) {
      for (int t = 0; t < len; ++t) seq.push_back(s), pos.push_back(from + t);
    };
    prompt(0, 0, 300);  // 4 full tiles and one of 44
    prompt(1, 0, 16);   // exactly the smallest tile
    prompt(2, 0, 7);    // per-query
    prompt(3, 100, 70); // a chunk of a longer prompt: keys 0..169
    seq.push_back(4), pos.push_back(399);  // a decode
    const int n = static_cast<int>(seq.size());
    std::vector<float> kc = RandomValues(static_cast<size_t>(seqs) * max_len * w, 20),
                       vc = RandomValues(kc.size(), 21), q = RandomValues(static_cast<size_t>(n) * w, 22, 2.0f),
                       ref(static_cast<size_t>(n) * w), cols(static_cast<size_t>(seqs) * c.heads * max_len, 0.0f);
    // Entries after each query run are never to be read: NaN there fails a kernel that reads them.
    for (int s = 0; s < 3; ++s) {
      const int len = s == 0 ? 300 : s == 1 ? 16 : 7;
      for (size_t x = (static_cast<size_t>(s) * max_len + len) * w; x < static_cast<size_t>(s + 1) * max_len * w; ++x) {
        kc[x] = vc[x] = NAN;
      }
    }
    auto hv = [](std::vector<float>& d, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d.data(), DType::kF32, sh); };
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    TensorView hseq = TensorView::Contiguous(seq.data(), DType::kI32, {n}), hpos = TensorView::Contiguous(pos.data(), DType::kI32, {n});
    ASSERT_TRUE(cpu_.Attention({hv(q, {n, w}), hv(kc, {seqs, max_len, w}), hv(vc, {seqs, max_len, w}), hseq, hpos,
                                hv(ref, {n, w}), c.heads, scale, hv(cols, {seqs, c.heads, max_len})})
                    .ok());
    TensorView dk = Up(kc, DType::kF32, {seqs, max_len, w}), dv = Up(vc, DType::kF32, {seqs, max_len, w});
    TensorView dq = Up(q, DType::kF32, {n, w}), dseq = Up(seq, DType::kI32, {n}), dpos = Up(pos, DType::kI32, {n});
    for (bool with_cols : {false, true}) {
      for (bool planned : {false, true}) {
        std::vector<float> zeros(cols.size(), 0.0f);
        AttentionArgs dev{dq, dk, dv, dseq, dpos, Poisoned({n, w}), c.heads, scale,
                          with_cols ? Up(zeros, DType::kF32, {seqs, c.heads, max_len}) : TensorView{}};
        if (planned) dev.host_seq_ids = seq.data(), dev.host_positions = pos.data();
        ASSERT_TRUE(gpu_->Attention(dev).ok());
        const double tol = planned ? 3e-3 : 1e-5;
        EXPECT_LT(RelErr(Down(dev.out), ref), tol) << c.heads << "x" << c.hd << " cols " << with_cols << " planned " << planned;
        if (with_cols) {
          std::vector<float> got = Down(dev.col_sums);
          // Columns past each row's last query stay exactly zero.
          EXPECT_EQ(got[(static_cast<size_t>(1) * c.heads) * max_len + 16], 0.0f);
          EXPECT_LT(RelErr(got, cols), tol) << c.heads << "x" << c.hd << " planned " << planned;
        }
      }
    }
  }
}

// H2O's slot ops: tokens written to chosen slots (-1: skipped), then attention over occupied slots
// returning every slot's probability; sequences with different occupancy, batch > 1.
TEST_F(CudaTwinTest, SlotKvWriteAndSlotAttention) {
  struct Case { int seqs, heads, slots, hd; };
  for (const Case& c : {Case{3, 2, 5, 8}, Case{4, 32, 103, 128}, Case{2, 3, 33, 256}}) {
    const int w = c.heads * c.hd, n = c.seqs;
    const size_t cells = static_cast<size_t>(c.seqs) * c.heads * c.slots;
    std::vector<float> ks = RandomValues(cells * c.hd, 30), vs = RandomValues(cells * c.hd, 31),
                       k = RandomValues(static_cast<size_t>(n) * w, 32), v = RandomValues(static_cast<size_t>(n) * w, 33),
                       q = RandomValues(static_cast<size_t>(n) * w, 34, 2.0f);
    std::vector<uint8_t> occ(cells);
    std::vector<int32_t> seq(n), slot_ids(static_cast<size_t>(n) * c.heads);
    for (int i = 0; i < n; ++i) seq[i] = n - 1 - i;  // rows in another order than queries
    for (size_t x = 0; x < cells; ++x) occ[x] = (x * 7919 % 5) != 0 && (x / c.slots) % 4 != 3 ? 1 : 0;
    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < c.heads; ++h) {
        const size_t cell = (static_cast<size_t>(seq[i]) * c.heads + h) * c.slots;
        int free = -1;
        for (int j = 0; j < c.slots && free < 0; ++j) if (!occ[cell + j]) free = j;
        slot_ids[static_cast<size_t>(i) * c.heads + h] = (i + h) % 3 == 2 ? -1 : free;  // some heads store nothing
        if (slot_ids[static_cast<size_t>(i) * c.heads + h] >= 0) occ[cell + free] = 1;
      }
    }
    auto hv = [](auto& d, DType t, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d.data(), t, sh); };
    TensorView dks = Up(ks, DType::kF32, {c.seqs, c.heads, c.slots, c.hd}), dvs = Up(vs, DType::kF32, {c.seqs, c.heads, c.slots, c.hd});
    TensorView dseq = Up(seq, DType::kI32, {n});
    ASSERT_TRUE(cpu_.SlotKvWrite({hv(k, DType::kF32, {n, w}), hv(v, DType::kF32, {n, w}), hv(ks, DType::kF32, {c.seqs, c.heads, c.slots, c.hd}),
                                  hv(vs, DType::kF32, {c.seqs, c.heads, c.slots, c.hd}), hv(seq, DType::kI32, {n}),
                                  hv(slot_ids, DType::kI32, {n, c.heads})})
                    .ok());
    ASSERT_TRUE(gpu_->SlotKvWrite({Up(k, DType::kF32, {n, w}), Up(v, DType::kF32, {n, w}), dks, dvs, dseq,
                                   Up(slot_ids, DType::kI32, {n, c.heads})})
                    .ok());
    EXPECT_EQ(Down(dks), ks);
    EXPECT_EQ(Down(dvs), vs);
    std::vector<float> out(static_cast<size_t>(n) * w), probs(static_cast<size_t>(n) * c.heads * c.slots);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    ASSERT_TRUE(cpu_.SlotAttention({hv(q, DType::kF32, {n, w}), hv(ks, DType::kF32, {c.seqs, c.heads, c.slots, c.hd}),
                                    hv(vs, DType::kF32, {c.seqs, c.heads, c.slots, c.hd}), hv(occ, DType::kU8, {c.seqs, c.heads, c.slots}),
                                    hv(seq, DType::kI32, {n}), hv(out, DType::kF32, {n, w}),
                                    hv(probs, DType::kF32, {n, c.heads, c.slots}), scale})
                    .ok());
    SlotAttentionArgs dev{Up(q, DType::kF32, {n, w}), dks, dvs, Up(occ, DType::kU8, {c.seqs, c.heads, c.slots}), dseq,
                          Poisoned({n, w}), Poisoned({n, c.heads, c.slots}), scale};
    ASSERT_TRUE(gpu_->SlotAttention(dev).ok());
    EXPECT_LT(RelErr(Down(dev.out), out), 1e-5) << c.seqs << "x" << c.heads << "x" << c.slots;
    EXPECT_LT(RelErr(Down(dev.probs), probs), 1e-5) << c.seqs << "x" << c.heads << "x" << c.slots;
  }
}

// Deja Vu's gathered rows: the bundled FFN over a scattered neuron subset, against the CPU twin
// (which the CPU tests hold to the dense FFN restricted to the same neurons). Small batches take
// the split-activation GEMMs (1e-5), large ones fp16-rounded activations (3e-3).
TEST_F(CudaTwinTest, BundledFfnGatheredRows) {
  struct Case { DType dtype; int n, d, m; double tol; };
  for (const Case& c : {Case{DType::kF16, 1, 64, 1, 1e-5}, Case{DType::kF16, 4, 4096, 2458, 1e-5},
                        Case{DType::kF16, 64, 1024, 777, 1e-5}, Case{DType::kBF16, 7, 320, 50, 1e-4},
                        Case{DType::kF32, 3, 100, 33, 1e-5}, Case{DType::kF16, 300, 512, 400, 3e-3},
                        Case{DType::kF16, 5, 256, 0, 1e-6}}) {
    const int width = 2 * c.d + 1;
    std::vector<float> x = RandomValues(static_cast<size_t>(c.n) * c.d, 50), bf = RandomValues(static_cast<size_t>(c.m) * width, 51, 0.05f),
                       b2 = RandomValues(c.d, 52), ref(static_cast<size_t>(c.n) * c.d);
    std::vector<char> bundles(bf.size() * DTypeSize(c.dtype));
    ConvertFromF32(c.dtype, bf.data(), bundles.data(), bf.size());
    ASSERT_TRUE(cpu_.BundledFfn({TensorView::Contiguous(x.data(), DType::kF32, {c.n, c.d}),
                                 TensorView::Contiguous(bundles.data(), c.dtype, {c.m, width}),
                                 TensorView::Contiguous(b2.data(), DType::kF32, {c.d}),
                                 TensorView::Contiguous(ref.data(), DType::kF32, {c.n, c.d})})
                    .ok());
    BundledFfnArgs dev{Up(x, DType::kF32, {c.n, c.d}), Up(bundles.data(), c.dtype, {c.m, width}), Up(b2, DType::kF32, {c.d}),
                       Poisoned({c.n, c.d})};
    ASSERT_TRUE(gpu_->BundledFfn(dev).ok());
    EXPECT_LT(RelErr(Down(dev.out), ref), c.tol) << DTypeName(c.dtype) << " " << c.n << "x" << c.d << " m " << c.m;
    if (c.m == 0 || c.dtype != DType::kF16) continue;
    // The executor's rows padded to 16 bytes (stride 2d + 8 here), NaN in the padding.
    const int stride = 2 * c.d + 8;
    std::vector<uint16_t> padded(static_cast<size_t>(c.m) * stride, 0x7e00);
    const uint16_t* rows = reinterpret_cast<const uint16_t*>(bundles.data());
    for (int j = 0; j < c.m; ++j) std::copy_n(rows + static_cast<size_t>(j) * width, width, padded.begin() + static_cast<size_t>(j) * stride);
    BundledFfnArgs pad{dev.x, Up(padded, DType::kF16, {c.m, stride}), dev.fc2_bias, Poisoned({c.n, c.d})};
    ASSERT_TRUE(gpu_->BundledFfn(pad).ok());
    EXPECT_LT(RelErr(Down(pad.out), ref), c.tol) << "padded " << c.n << "x" << c.d << " m " << c.m;
  }
}

// Quantized bundles (a q4/q8 store's Deja Vu rows): dequantized on the device into fp16, then the
// same GEMMs, against the CPU twin's fp32 dequantization (3e-3: the fp16 rounding of the values).
TEST_F(CudaTwinTest, QuantizedBundledFfn) {
  struct Case { const char* format; int n, d, m; };
  for (const Case& c : {Case{"q8g64", 4, 256, 300}, Case{"q4g64", 1, 64, 1}, Case{"q4g32", 64, 1024, 777},
                        Case{"q8g32", 300, 512, 400}, Case{"q4g64", 5, 256, 0}}) {
    SCOPED_TRACE(::testing::Message() << c.format << " " << c.n << "x" << c.d << " m " << c.m);
    const QuantFormat f = *ParseQuantFormatName(c.format);
    auto layout = LayoutQuantBundle(f, c.d);
    ASSERT_TRUE(layout.ok());
    const size_t bytes = layout->bytes;
    std::vector<float> x = RandomValues(static_cast<size_t>(c.n) * c.d, 60), vals = RandomValues(static_cast<size_t>(c.m) * 2 * c.d, 61, 0.05f),
                       b1 = RandomValues(static_cast<size_t>(c.m), 62), b2 = RandomValues(c.d, 63), ref(static_cast<size_t>(c.n) * c.d);
    std::vector<uint8_t> bundles(std::max<size_t>(1, static_cast<size_t>(c.m) * bytes), 0);
    for (int j = 0; j < c.m; ++j) {
      uint8_t* b = bundles.data() + static_cast<size_t>(j) * bytes;
      QuantizeSpan(f, layout->row, vals.data() + static_cast<size_t>(j) * 2 * c.d, 2 * c.d, 0, 0, 2 * c.d, b);
      std::memcpy(b + layout->bias_offset, &b1[static_cast<size_t>(j)], sizeof(float));
    }
    TensorView hb = TensorView::Contiguous(bundles.data(), DType::kU8, {c.m, static_cast<int64_t>(bytes)});
    hb.quant = f;
    ASSERT_TRUE(cpu_.BundledFfn({TensorView::Contiguous(x.data(), DType::kF32, {c.n, c.d}), hb,
                                 TensorView::Contiguous(b2.data(), DType::kF32, {c.d}),
                                 TensorView::Contiguous(ref.data(), DType::kF32, {c.n, c.d})})
                    .ok());
    TensorView db = Up(bundles.data(), DType::kU8, {c.m, static_cast<int64_t>(bytes)});
    db.quant = f;
    BundledFfnArgs dev{Up(x, DType::kF32, {c.n, c.d}), db, Up(b2, DType::kF32, {c.d}), Poisoned({c.n, c.d})};
    ASSERT_TRUE(gpu_->BundledFfn(dev).ok());
    EXPECT_LT(RelErr(Down(dev.out), ref), 3e-3);
  }
}

// H2O's bookkeeping on the device: 40 decode steps of place + update over sequences that start
// with different occupancy, with random probabilities, against the CPU twin: identical slot
// positions, occupancy and scores at every step (the same float additions in the same order).
TEST_F(CudaTwinTest, H2OPlaceAndUpdate) {
  const int seqs = 5, heads = 7, budget = 12, recent = 4, protect = 2, slots = budget + 1;
  const size_t cells = static_cast<size_t>(seqs) * heads * slots;
  std::vector<int32_t> pos(cells, -1);
  std::vector<float> score(cells, 0.0f);
  std::vector<uint8_t> occ(cells, 0);
  std::vector<int32_t> length(seqs);
  for (int s = 0; s < seqs; ++s) {  // row s starts with 2 s tokens
    length[s] = 2 * s;
    for (int h = 0; h < heads; ++h) {
      for (int j = 0; j < std::min(2 * s, budget); ++j) {
        const size_t c = (static_cast<size_t>(s) * heads + h) * slots + j;
        pos[c] = j, occ[c] = 1, score[c] = 0.01f * ((j * 7 + h) % 5);
      }
    }
  }
  auto hv = [](auto& d, DType t, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d.data(), t, sh); };
  TensorView dpos = Up(pos, DType::kI32, {seqs, heads, slots}), dscore = Up(score, DType::kF32, {seqs, heads, slots}),
             docc = Up(occ, DType::kU8, {seqs, heads, slots});
  for (int step = 0; step < 40; ++step) {
    std::vector<int32_t> seq, at;
    for (int s = 0; s < seqs; ++s) {
      if ((s + step) % 4 == 3) continue;  // not every row in every step
      seq.push_back(s), at.push_back(length[s]++);
    }
    const int n = static_cast<int>(seq.size());
    std::vector<int32_t> ids(static_cast<size_t>(n) * heads, -9);
    std::vector<float> probs = RandomValues(static_cast<size_t>(n) * heads * slots, 100 + step, 0.5f);
    for (float& p : probs) p = std::abs(p);
    ASSERT_TRUE(cpu_.H2OPlace({hv(seq, DType::kI32, {n}), hv(at, DType::kI32, {n}), hv(pos, DType::kI32, {seqs, heads, slots}),
                               hv(score, DType::kF32, {seqs, heads, slots}), hv(occ, DType::kU8, {seqs, heads, slots}),
                               hv(ids, DType::kI32, {n, heads})})
                    .ok());
    TensorView dseq = Up(seq, DType::kI32, {n}), dat = Up(at, DType::kI32, {n});
    std::vector<int32_t> poison(ids.size(), -9);
    TensorView dids = Up(poison, DType::kI32, {n, heads});
    ASSERT_TRUE(gpu_->H2OPlace({dseq, dat, dpos, dscore, docc, dids}).ok());
    std::vector<int32_t> got_ids(ids.size());
    ASSERT_TRUE(gpu_->CopyToHost(got_ids.data(), dids.data, got_ids.size() * sizeof(int32_t)).ok());
    EXPECT_EQ(got_ids, ids) << "step " << step;
    ASSERT_TRUE(cpu_.H2OUpdate({hv(seq, DType::kI32, {n}), hv(at, DType::kI32, {n}), hv(probs, DType::kF32, {n, heads, slots}),
                                hv(pos, DType::kI32, {seqs, heads, slots}), hv(score, DType::kF32, {seqs, heads, slots}),
                                hv(occ, DType::kU8, {seqs, heads, slots}), budget, recent, protect})
                    .ok());
    ASSERT_TRUE(gpu_->H2OUpdate({dseq, dat, Up(probs, DType::kF32, {n, heads, slots}), dpos, dscore, docc, budget, recent, protect}).ok());
    std::vector<int32_t> gpos(cells);
    std::vector<uint8_t> gocc(cells);
    ASSERT_TRUE(gpu_->CopyToHost(gpos.data(), dpos.data, cells * sizeof(int32_t)).ok());
    ASSERT_TRUE(gpu_->CopyToHost(gocc.data(), docc.data, cells).ok());
    EXPECT_EQ(gpos, pos) << "step " << step;
    EXPECT_EQ(gocc, occ) << "step " << step;
    EXPECT_EQ(Down(dscore), score) << "step " << step;
  }
  // Every row over budget holds exactly `budget` tokens, the recent and protected among them.
  for (int s = 0; s < seqs; ++s) {
    int held = 0;
    for (int j = 0; j < slots; ++j) held += occ[(static_cast<size_t>(s) * heads) * slots + j];
    EXPECT_EQ(held, std::min(length[s], budget)) << "row " << s;
  }
}

// H2O's prefill selection on the device against the CPU twin: prompts longer and shorter than the
// budget, ties among the column sums (the oldest wins), protected positions, rows in any order.
TEST_F(CudaTwinTest, H2OPrefillSelection) {
  const int seqs = 6, heads = 5, heavy = 9, recent = 6, protect = 2, slots = heavy + recent + 1, max_len = 700;
  const std::vector<int32_t> lengths = {700, 3, 16, 15, 400}, rows = {4, 0, 2, 5, 1};
  const int used = static_cast<int>(lengths.size());
  std::vector<float> cols = RandomValues(static_cast<size_t>(used) * heads * max_len, 60, 4.0f);
  for (size_t i = 0; i < cols.size(); ++i) {
    cols[i] = std::round(std::abs(cols[i]));  // few distinct values: many ties
  }
  const size_t cells = static_cast<size_t>(seqs) * heads * slots;
  std::vector<int32_t> pos(cells, 7), token_slot(static_cast<size_t>(used) * max_len * heads, -9);
  std::vector<float> score(cells, 3.0f);
  std::vector<uint8_t> occ(cells, 1);  // row 3 keeps this junk: not in the call
  auto hv = [](auto& d, DType t, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d.data(), t, sh); };
  std::vector<int32_t> lens = lengths, rws = rows;
  ASSERT_TRUE(cpu_.H2OPrefill({hv(cols, DType::kF32, {used, heads, max_len}), hv(lens, DType::kI32, {used}), hv(rws, DType::kI32, {used}),
                               hv(pos, DType::kI32, {seqs, heads, slots}), hv(score, DType::kF32, {seqs, heads, slots}),
                               hv(occ, DType::kU8, {seqs, heads, slots}), hv(token_slot, DType::kI32, {used * max_len, heads}), heavy,
                               recent, protect})
                  .ok());
  std::vector<int32_t> pos0(cells, 7), poison(token_slot.size(), -9);
  std::vector<float> score0(cells, 3.0f);
  std::vector<uint8_t> occ0(cells, 1);
  TensorView dpos = Up(pos0, DType::kI32, {seqs, heads, slots}), dscore = Up(score0, DType::kF32, {seqs, heads, slots}),
             docc = Up(occ0, DType::kU8, {seqs, heads, slots}), dslot = Up(poison, DType::kI32, {used * max_len, heads});
  ASSERT_TRUE(gpu_->H2OPrefill({Up(cols, DType::kF32, {used, heads, max_len}), Up(lens, DType::kI32, {used}), Up(rws, DType::kI32, {used}),
                                dpos, dscore, docc, dslot, heavy, recent, protect})
                  .ok());
  std::vector<int32_t> gpos(cells), gslot(token_slot.size());
  std::vector<uint8_t> gocc(cells);
  ASSERT_TRUE(gpu_->CopyToHost(gpos.data(), dpos.data, cells * sizeof(int32_t)).ok());
  ASSERT_TRUE(gpu_->CopyToHost(gocc.data(), docc.data, cells).ok());
  ASSERT_TRUE(gpu_->CopyToHost(gslot.data(), dslot.data, gslot.size() * sizeof(int32_t)).ok());
  EXPECT_EQ(gpos, pos);
  EXPECT_EQ(gocc, occ);
  EXPECT_EQ(Down(dscore), score);
  EXPECT_EQ(gslot, token_slot);
}

// Deja Vu's fetch: scattered rows of a pinned host table gathered by one kernel, for row sizes that
// take each copy unit (16, 4, 2 and 1 bytes), against the CPU twin.
TEST_F(CudaTwinTest, GatherHostRows) {
  for (size_t row_bytes : {size_t{16384}, size_t{16386}, size_t{1028}, size_t{7}}) {
    const int table_rows = 300;
    auto table = gpu_->AllocateHost(row_bytes * table_rows);
    ASSERT_TRUE(table.ok());
    for (size_t i = 0; i < row_bytes * table_rows; ++i) static_cast<unsigned char*>(table->data())[i] = static_cast<unsigned char>(i * 131 + 7);
    const std::vector<int32_t> rows = {0, 1, 2, 17, 18, 150, 299, 5};
    std::vector<unsigned char> want(rows.size() * row_bytes), got(want.size(), 0xee);
    ASSERT_TRUE(cpu_.GatherHostRows(table->data(), row_bytes, rows, want.data()).ok());
    TensorView dst = Up(got, DType::kU8, {static_cast<int64_t>(got.size())});
    ASSERT_TRUE(gpu_->GatherHostRows(table->data(), row_bytes, rows, dst.data).ok());
    ASSERT_TRUE(gpu_->CopyToHost(got.data(), dst.data, got.size()).ok());
    EXPECT_EQ(got, want) << row_bytes;
  }
}

// Sampling on the device against the CPU twin with the same draws: temperature alone, top-k, top-p
// and both, over OPT's vocabulary and a tiny one, logits with many ties (rounded) so the order
// among equal logits (the lower id first) matters.
TEST_F(CudaTwinTest, SampleRows) {
  struct Case { int rows, vocab; SamplingParams p; bool ties; };
  for (const Case& c : {Case{6, 50272, {0.8f, 0, 1.0f}, false}, Case{6, 50272, {1.0f, 40, 1.0f}, true},
                        Case{6, 50272, {0.7f, 0, 0.9f}, true}, Case{4, 7, {1.3f, 3, 0.95f}, false}, Case{3, 1000, {2.0f, 0, 0.5f}, true}}) {
    std::vector<float> logits = RandomValues(static_cast<size_t>(c.rows) * c.vocab, 70, 6.0f);
    if (c.ties) {
      for (float& x : logits) x = std::round(x);
    }
    std::vector<double> u(c.rows);
    for (int r = 0; r < c.rows; ++r) u[r] = (r * 0.6180339887 + 0.123) - std::floor(r * 0.6180339887 + 0.123);
    std::vector<int32_t> want(c.rows), got(c.rows, -1);
    ASSERT_TRUE(cpu_.SampleRows({TensorView::Contiguous(logits.data(), DType::kF32, {c.rows, c.vocab}), u.data(), c.p,
                                 TensorView::Contiguous(want.data(), DType::kI32, {c.rows})})
                    .ok());
    std::vector<int32_t> poison(c.rows, -7);
    TensorView ids = Up(poison, DType::kI32, {c.rows});
    ASSERT_TRUE(gpu_->SampleRows({Up(logits, DType::kF32, {c.rows, c.vocab}), u.data(), c.p, ids}).ok());
    ASSERT_TRUE(gpu_->CopyToHost(got.data(), ids.data, c.rows * sizeof(int32_t)).ok());
    EXPECT_EQ(got, want) << c.vocab << " T " << c.p.temperature << " k " << c.p.top_k << " p " << c.p.top_p;
  }
}

TEST_F(CudaTwinTest, ArgMaxRows) {
  for (auto [rows, vocab] : {std::pair<int, int>{1, 1}, {3, 7}, {64, 50272}, {5, 8192}}) {
    std::vector<float> logits = RandomValues(static_cast<size_t>(rows) * vocab, 40, 10.0f);
    if (vocab > 2) logits[1] = logits[2] = 100.0f;  // a tie in row 0: the lower index wins
    std::vector<int32_t> ref(rows), got(rows, -1);
    ASSERT_TRUE(cpu_.ArgMaxRows(TensorView::Contiguous(logits.data(), DType::kF32, {rows, vocab}),
                                TensorView::Contiguous(ref.data(), DType::kI32, {rows}))
                    .ok());
    std::vector<int32_t> poison(rows, -7);
    TensorView ids = Up(poison, DType::kI32, {rows});
    ASSERT_TRUE(gpu_->ArgMaxRows(Up(logits, DType::kF32, {rows, vocab}), ids).ok());
    ASSERT_TRUE(gpu_->CopyToHost(got.data(), ids.data, rows * sizeof(int32_t)).ok());
    EXPECT_EQ(got, ref) << rows << "x" << vocab;
  }
}

TEST_F(CudaTwinTest, BudgetIsAPromise) {
  auto b = CudaBackend::Create({0, 1 << 20});
  ASSERT_TRUE(b.ok());
  auto a = (*b)->Allocate(700 << 10);
  ASSERT_TRUE(a.ok());
  auto over = (*b)->Allocate(400 << 10);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_LE((*b)->peak_allocated_bytes(), 1u << 20);
}

}  // namespace
}  // namespace ferry::kernels::cuda
