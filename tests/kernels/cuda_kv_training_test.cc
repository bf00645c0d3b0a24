// More CUDA ops against their CPU twins (see cuda_backend_test.cc for the tolerances): the F16 and
// q8/q4 KV caches, the training ops of Deja Vu's predictors and the row copies of its device-side cache. Skips (GTEST_SKIP) where no GPU is visible.
#include <cmath>
#include <cstring>

#include "cuda_twin.h"

namespace ferry::kernels::cuda {
namespace {

using ferry::testing::RandomValues;

// F16 keys and values: the cache write rounds as the CPU does (bitwise), the per-query and slot
// attention read them into fp32 (1e-5 of the CPU twin on the same F16 cache), the tensor-core
// prefill loads them as they are (3e-3), with and without H2O's column sums; slots take F32 or F16
// tokens.
TEST_F(CudaTwinTest, F16KvCache) {
  // head_dim 64 and 200: the __half2 loads (200: a partial last pair group); 33: scalar halves.
  for (const int hd : {64, 200, 33}) {
    SCOPED_TRACE(hd);
    const int seqs = 3, max_len = 300, heads = 4, w = heads * hd;
    std::vector<int32_t> seq, pos;
    for (int t = 0; t < 200; ++t) seq.push_back(0), pos.push_back(t);  // a prompt: tiles when planned
    seq.push_back(1), pos.push_back(0);
    seq.push_back(2), pos.push_back(0);
    const int n = static_cast<int>(seq.size());
    std::vector<float> k = RandomValues(static_cast<size_t>(n) * w, 40, 3.0f), v = RandomValues(k.size(), 41, 3.0f),
                       q = RandomValues(k.size(), 42, 2.0f), ref(k.size()), cols(static_cast<size_t>(seqs) * heads * max_len, 0.0f);
    std::vector<uint16_t> kc(static_cast<size_t>(seqs) * max_len * w, 0), vc(kc.size(), 0);
    auto hv = [](auto& d, DType t, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d.data(), t, sh); };
    TensorView hseq = hv(seq, DType::kI32, {n}), hpos = hv(pos, DType::kI32, {n});
    ASSERT_TRUE(cpu_.KvWrite({hv(k, DType::kF32, {n, w}), hv(v, DType::kF32, {n, w}), hv(kc, DType::kF16, {seqs, max_len, w}),
                              hv(vc, DType::kF16, {seqs, max_len, w}), hseq, hpos})
                    .ok());
    const float scale = 0.125f;
    ASSERT_TRUE(cpu_.Attention({hv(q, DType::kF32, {n, w}), hv(kc, DType::kF16, {seqs, max_len, w}), hv(vc, DType::kF16, {seqs, max_len, w}),
                                hseq, hpos, hv(ref, DType::kF32, {n, w}), heads, scale, hv(cols, DType::kF32, {seqs, heads, max_len})})
                    .ok());
    std::vector<uint16_t> zeros16(kc.size(), 0);
    TensorView dk = Up(zeros16, DType::kF16, {seqs, max_len, w}), dv = Up(zeros16, DType::kF16, {seqs, max_len, w});
    TensorView dseq = Up(seq, DType::kI32, {n}), dpos = Up(pos, DType::kI32, {n}), dq = Up(q, DType::kF32, {n, w});
    ASSERT_TRUE(gpu_->KvWrite({Up(k, DType::kF32, {n, w}), Up(v, DType::kF32, {n, w}), dk, dv, dseq, dpos}).ok());
    std::vector<uint16_t> got16(kc.size());
    ASSERT_TRUE(gpu_->CopyToHost(got16.data(), dk.data, dk.bytes()).ok());
    EXPECT_EQ(got16, kc);
    ASSERT_TRUE(gpu_->CopyToHost(got16.data(), dv.data, dv.bytes()).ok());
    EXPECT_EQ(got16, vc);
    for (bool planned : {false, true}) {
      std::vector<float> zeros(cols.size(), 0.0f);
      AttentionArgs dev{dq, dk, dv, dseq, dpos, Poisoned({n, w}), heads, scale, Up(zeros, DType::kF32, {seqs, heads, max_len})};
      if (planned) dev.host_seq_ids = seq.data(), dev.host_positions = pos.data();
      ASSERT_TRUE(gpu_->Attention(dev).ok());
      const double tol = planned ? 3e-3 : 1e-5;
      EXPECT_LT(RelErr(Down(dev.out), ref), tol) << "planned " << planned;
      EXPECT_LT(RelErr(Down(dev.col_sums), cols), tol) << "planned " << planned;
    }

    // Slots: F32 tokens into F16 slots (rounded as the CPU), F16 tokens into F16 slots (copied), then
    // slot attention over F16 slots.
    const int slots = 7;
    const size_t cells = static_cast<size_t>(seqs) * heads * slots;
    std::vector<int32_t> sseq = {2, 0, 1}, slot_ids;
    std::vector<uint8_t> occ(cells, 0);
    for (int i = 0; i < 3; ++i) {
      for (int h = 0; h < heads; ++h) {
        const int slot = (i * 3 + h) % slots;
        slot_ids.push_back(slot);
        occ[(static_cast<size_t>(sseq[i]) * heads + h) * slots + slot] = 1;
      }
    }
    std::vector<uint16_t> s_cpu(cells * hd, 0), t_cpu(cells * hd, 0), k3(3 * w);
    ConvertFromF32(DType::kF16, k.data(), k3.data(), k3.size());
    const std::initializer_list<int64_t> sshape = {seqs, heads, slots, hd};
    ASSERT_TRUE(cpu_.SlotKvWrite({hv(k, DType::kF32, {3, w}), hv(v, DType::kF32, {3, w}), hv(s_cpu, DType::kF16, sshape),
                                  hv(t_cpu, DType::kF16, sshape), hv(sseq, DType::kI32, {3}), hv(slot_ids, DType::kI32, {3, heads})})
                    .ok());
    std::vector<uint16_t> zeros_slots(cells * hd, 0);
    TensorView ds = Up(zeros_slots, DType::kF16, sshape), dt = Up(zeros_slots, DType::kF16, sshape), dsseq = Up(sseq, DType::kI32, {3}),
               dslot = Up(slot_ids, DType::kI32, {3, heads});
    std::vector<float> k3f(k.begin(), k.begin() + 3 * w), v3f(v.begin(), v.begin() + 3 * w);
    ASSERT_TRUE(gpu_->SlotKvWrite({Up(k3f, DType::kF32, {3, w}), Up(v3f, DType::kF32, {3, w}), ds, dt, dsseq, dslot}).ok());
    std::vector<uint16_t> slots_got(cells * hd);
    ASSERT_TRUE(gpu_->CopyToHost(slots_got.data(), ds.data, ds.bytes()).ok());
    EXPECT_EQ(slots_got, s_cpu);
    TensorView ds2 = Up(zeros_slots, DType::kF16, sshape), dt2 = Up(zeros_slots, DType::kF16, sshape);
    ASSERT_TRUE(gpu_->SlotKvWrite({Up(k3, DType::kF16, {3, w}), Up(k3, DType::kF16, {3, w}), ds2, dt2, dsseq, dslot}).ok());
    ASSERT_TRUE(gpu_->CopyToHost(slots_got.data(), ds2.data, ds2.bytes()).ok());
    EXPECT_EQ(slots_got, s_cpu);
    std::vector<float> out(3 * w), probs(3 * heads * slots);
    ASSERT_TRUE(cpu_.SlotAttention({hv(q, DType::kF32, {3, w}), hv(s_cpu, DType::kF16, sshape), hv(t_cpu, DType::kF16, sshape),
                                    hv(occ, DType::kU8, {seqs, heads, slots}), hv(sseq, DType::kI32, {3}), hv(out, DType::kF32, {3, w}),
                                    hv(probs, DType::kF32, {3, heads, slots}), scale})
                    .ok());
    std::vector<float> q3(q.begin(), q.begin() + 3 * w);
    SlotAttentionArgs dev{Up(q3, DType::kF32, {3, w}), ds, dt, Up(occ, DType::kU8, {seqs, heads, slots}), dsseq,
                          Poisoned({3, w}), Poisoned({3, heads, slots}), scale};
    ASSERT_TRUE(gpu_->SlotAttention(dev).ok());
    EXPECT_LT(RelErr(Down(dev.out), out), 1e-5);
    EXPECT_LT(RelErr(Down(dev.probs), probs), 1e-5);
  }
}

// q8/q4 keys and values (groups along head_dim): the cache writes quantize as the CPU does
// (bitwise: codes, scales and minimums), the per-query and slot attention dequantize inside the
// kernel with fp32 compute (1e-5 of the CPU twin over the same quantized cache), the tensor-core
// prefill loads the dequantized values as fp16 (3e-3), with and without H2O's column sums; slots
// take F32 or F16 tokens.
TEST_F(CudaTwinTest, QuantizedKvCache) {
  // head_dim 64 (group 64, tiles), 48 (group 16, tiles), 200 (group 8, per-query only).
  for (const char* kind : {"q8", "q4"}) {
    for (const int hd : {64, 48, 200}) {
      SCOPED_TRACE(::testing::Message() << kind << " hd " << hd);
      auto type = ParseKvType(kind, hd);
      ASSERT_TRUE(type.ok());
      const QuantFormat f = *type->quant;
      const int seqs = 3, max_len = 300, heads = 4, kv_heads = 2, w = heads * hd, kvw = kv_heads * hd;
      std::vector<int32_t> seq, pos;
      for (int t = 0; t < 200; ++t) seq.push_back(0), pos.push_back(t);
      seq.push_back(1), pos.push_back(0);
      seq.push_back(2), pos.push_back(0);
      const int n = static_cast<int>(seq.size());
      std::vector<float> k = RandomValues(static_cast<size_t>(n) * kvw, 50 + hd, 3.0f), v = RandomValues(k.size(), 51 + hd, 3.0f),
                         q = RandomValues(static_cast<size_t>(n) * w, 52 + hd, 2.0f), ref(q.size()),
                         cols(static_cast<size_t>(seqs) * heads * max_len, 0.0f);
      const size_t cache_bytes = type->Bytes(static_cast<int64_t>(seqs) * max_len, kvw);
      ASSERT_GT(cache_bytes, 0u);
      std::vector<uint8_t> kc(cache_bytes, 0), vc(cache_bytes, 0);
      auto hv = [](auto& d, DType t, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d.data(), t, sh); };
      auto qv = [&](TensorView t) {
        t.quant = f;
        return t;
      };
      TensorView hseq = hv(seq, DType::kI32, {n}), hpos = hv(pos, DType::kI32, {n});
      ASSERT_TRUE(cpu_.KvWrite({hv(k, DType::kF32, {n, kvw}), hv(v, DType::kF32, {n, kvw}), qv(hv(kc, DType::kU8, {seqs, max_len, kvw})),
                                qv(hv(vc, DType::kU8, {seqs, max_len, kvw})), hseq, hpos})
                      .ok());
      const float scale = 0.125f;
      AttentionArgs host{hv(q, DType::kF32, {n, w}), qv(hv(kc, DType::kU8, {seqs, max_len, kvw})), qv(hv(vc, DType::kU8, {seqs, max_len, kvw})),
                         hseq, hpos, hv(ref, DType::kF32, {n, w}), heads, scale, hv(cols, DType::kF32, {seqs, heads, max_len})};
      host.num_kv_heads = kv_heads;
      ASSERT_TRUE(cpu_.Attention(host).ok());
      std::vector<uint8_t> zeros8(cache_bytes, 0);
      TensorView dk = qv(Up(zeros8, DType::kU8, {seqs, max_len, kvw})), dv = qv(Up(zeros8, DType::kU8, {seqs, max_len, kvw}));
      TensorView dseq = Up(seq, DType::kI32, {n}), dpos = Up(pos, DType::kI32, {n}), dq = Up(q, DType::kF32, {n, w});
      ASSERT_TRUE(gpu_->KvWrite({Up(k, DType::kF32, {n, kvw}), Up(v, DType::kF32, {n, kvw}), dk, dv, dseq, dpos}).ok());
      std::vector<uint8_t> got(cache_bytes);
      ASSERT_TRUE(gpu_->CopyToHost(got.data(), dk.data, cache_bytes).ok());
      EXPECT_EQ(got, kc);
      ASSERT_TRUE(gpu_->CopyToHost(got.data(), dv.data, cache_bytes).ok());
      EXPECT_EQ(got, vc);
      for (bool planned : {false, true}) {
        std::vector<float> zeros(cols.size(), 0.0f);
        AttentionArgs dev{dq, dk, dv, dseq, dpos, Poisoned({n, w}), heads, scale, Up(zeros, DType::kF32, {seqs, heads, max_len})};
        dev.num_kv_heads = kv_heads;
        if (planned) dev.host_seq_ids = seq.data(), dev.host_positions = pos.data();
        ASSERT_TRUE(gpu_->Attention(dev).ok());
        const double tol = planned && hd <= 128 ? 3e-3 : 1e-5;
        EXPECT_LT(RelErr(Down(dev.out), ref), tol) << "planned " << planned;
        EXPECT_LT(RelErr(Down(dev.col_sums), cols), tol) << "planned " << planned;
      }

      // Slots [seqs, kv_heads, slots, hd]: F32 and F16 tokens, then slot attention.
      const int slots = 7;
      const int64_t slot_rows = static_cast<int64_t>(seqs) * kv_heads * slots;
      const size_t slot_bytes = type->Bytes(slot_rows, hd);
      std::vector<int32_t> sseq = {2, 0, 1}, slot_ids;
      std::vector<uint8_t> occ(static_cast<size_t>(slot_rows), 0);
      for (int i = 0; i < 3; ++i) {
        for (int h = 0; h < kv_heads; ++h) {
          const int slot = (i * 3 + h) % slots;
          slot_ids.push_back(slot);
          occ[(static_cast<size_t>(sseq[i]) * kv_heads + h) * slots + slot] = 1;
        }
      }
      const std::initializer_list<int64_t> sshape = {seqs, kv_heads, slots, hd};
      std::vector<uint8_t> s_cpu(slot_bytes, 0), t_cpu(slot_bytes, 0);
      std::vector<float> k3f(k.begin(), k.begin() + 3 * kvw), v3f(v.begin(), v.begin() + 3 * kvw);
      ASSERT_TRUE(cpu_.SlotKvWrite({hv(k3f, DType::kF32, {3, kvw}), hv(v3f, DType::kF32, {3, kvw}), qv(hv(s_cpu, DType::kU8, sshape)),
                                    qv(hv(t_cpu, DType::kU8, sshape)), hv(sseq, DType::kI32, {3}), hv(slot_ids, DType::kI32, {3, kv_heads})})
                      .ok());
      std::vector<uint8_t> zeros_slots(slot_bytes, 0);
      TensorView ds = qv(Up(zeros_slots, DType::kU8, sshape)), dt = qv(Up(zeros_slots, DType::kU8, sshape)),
                 dsseq = Up(sseq, DType::kI32, {3}), dslot = Up(slot_ids, DType::kI32, {3, kv_heads});
      ASSERT_TRUE(gpu_->SlotKvWrite({Up(k3f, DType::kF32, {3, kvw}), Up(v3f, DType::kF32, {3, kvw}), ds, dt, dsseq, dslot}).ok());
      std::vector<uint8_t> slots_got(slot_bytes);
      ASSERT_TRUE(gpu_->CopyToHost(slots_got.data(), ds.data, slot_bytes).ok());
      EXPECT_EQ(slots_got, s_cpu);
      ASSERT_TRUE(gpu_->CopyToHost(slots_got.data(), dt.data, slot_bytes).ok());
      EXPECT_EQ(slots_got, t_cpu);
      // F16 tokens: the CPU quantizes their fp32 values; so must the GPU.
      std::vector<uint16_t> k16(3 * kvw);
      ConvertFromF32(DType::kF16, k3f.data(), k16.data(), k16.size());
      std::vector<uint8_t> s16_cpu(slot_bytes, 0), t16_cpu(slot_bytes, 0);
      ASSERT_TRUE(cpu_.SlotKvWrite({hv(k16, DType::kF16, {3, kvw}), hv(k16, DType::kF16, {3, kvw}), qv(hv(s16_cpu, DType::kU8, sshape)),
                                    qv(hv(t16_cpu, DType::kU8, sshape)), hv(sseq, DType::kI32, {3}), hv(slot_ids, DType::kI32, {3, kv_heads})})
                      .ok());
      TensorView ds2 = qv(Up(zeros_slots, DType::kU8, sshape)), dt2 = qv(Up(zeros_slots, DType::kU8, sshape));
      ASSERT_TRUE(gpu_->SlotKvWrite({Up(k16, DType::kF16, {3, kvw}), Up(k16, DType::kF16, {3, kvw}), ds2, dt2, dsseq, dslot}).ok());
      ASSERT_TRUE(gpu_->CopyToHost(slots_got.data(), ds2.data, slot_bytes).ok());
      EXPECT_EQ(slots_got, s16_cpu);
      std::vector<float> out(3 * w), probs(3 * heads * slots);
      std::vector<float> q3(q.begin(), q.begin() + 3 * w);
      ASSERT_TRUE(cpu_.SlotAttention({hv(q3, DType::kF32, {3, w}), qv(hv(s_cpu, DType::kU8, sshape)), qv(hv(t_cpu, DType::kU8, sshape)),
                                      hv(occ, DType::kU8, {seqs, kv_heads, slots}), hv(sseq, DType::kI32, {3}), hv(out, DType::kF32, {3, w}),
                                      hv(probs, DType::kF32, {3, heads, slots}), scale})
                      .ok());
      SlotAttentionArgs dev{Up(q3, DType::kF32, {3, w}), ds, dt, Up(occ, DType::kU8, {seqs, kv_heads, slots}), dsseq,
                            Poisoned({3, w}), Poisoned({3, heads, slots}), scale};
      ASSERT_TRUE(gpu_->SlotAttention(dev).ok());
      EXPECT_LT(RelErr(Down(dev.out), out), 1e-5);
      EXPECT_LT(RelErr(Down(dev.probs), probs), 1e-5);
    }
  }
  // A group that is not a power of two is refused with a clear error, not read wrong.
  std::vector<uint8_t> bytes(4096, 0);
  std::vector<float> k(12, 1.0f);
  std::vector<int32_t> zero = {0};
  TensorView cache = Up(bytes, DType::kU8, {1, 1, 12});
  cache.quant = QuantFormat{QuantKind::kQ8, 6};
  const absl::Status refused =
      gpu_->KvWrite({Up(k, DType::kF32, {1, 12}), Up(k, DType::kF32, {1, 12}), cache, cache, Up(zero, DType::kI32, {1}), Up(zero, DType::kI32, {1})});
  EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
}

// Training ops (Deja Vu's predictors on the GPU): fp32 SGEMM in every transpose combination, odd
// and predictor-sized shapes, with and without bias rows (1e-5 of the CPU's OpenBLAS); the BCE
// gradient and its column sums (1e-5); Adam (1e-6).
TEST_F(CudaTwinTest, TrainingOps) {
  struct Case { int m, k, n; };
  for (const Case& c : {Case{13, 37, 29}, Case{512, 4096, 128}, Case{128, 512, 16384}, Case{1, 1, 1}}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        std::vector<float> a = RandomValues(static_cast<size_t>(c.m) * c.k, 60), b = RandomValues(static_cast<size_t>(c.k) * c.n, 61),
                           bias = RandomValues(c.n, 62), ref(static_cast<size_t>(c.m) * c.n);
        const bool with_bias = ta != tb;
        // Shapes as plain dims: an initializer_list picked by ?: would outlive its backing array.
        const int64_t a0 = ta ? c.k : c.m, a1 = ta ? c.m : c.k, b0 = tb ? c.n : c.k, b1 = tb ? c.k : c.n;
        ASSERT_TRUE(cpu_.MatMul({TensorView::Contiguous(a.data(), DType::kF32, {a0, a1}), TensorView::Contiguous(b.data(), DType::kF32, {b0, b1}),
                                 TensorView::Contiguous(ref.data(), DType::kF32, {c.m, c.n}), ta, tb,
                                 with_bias ? TensorView::Contiguous(bias.data(), DType::kF32, {c.n}) : TensorView{}})
                        .ok());
        MatMulArgs dev{Up(a, DType::kF32, {a0, a1}), Up(b, DType::kF32, {b0, b1}), Poisoned({c.m, c.n}), ta, tb,
                       with_bias ? Up(bias, DType::kF32, {c.n}) : TensorView{}};
        ASSERT_TRUE(gpu_->MatMul(dev).ok());
        EXPECT_LT(RelErr(Down(dev.out), ref), 1e-5) << c.m << "x" << c.k << "x" << c.n << " " << ta << tb;
      }
    }
  }
  const int rows = 512, f = 1027, row_bytes = (f + 7) / 8;
  std::vector<float> z = RandomValues(static_cast<size_t>(rows) * f, 63, 4.0f), g(z.size()), gb(f);
  std::vector<uint8_t> labels(static_cast<size_t>(rows) * row_bytes);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
  auto hv = [](auto& d, DType t, std::initializer_list<int64_t> sh) { return TensorView::Contiguous(d.data(), t, sh); };
  ASSERT_TRUE(cpu_.BceGrad({hv(z, DType::kF32, {rows, f}), hv(labels, DType::kU8, {rows, row_bytes}), hv(g, DType::kF32, {rows, f}),
                            hv(gb, DType::kF32, {f}), 3.9f, 0.57f})
                  .ok());
  BceGradArgs bce{Up(z, DType::kF32, {rows, f}), Up(labels, DType::kU8, {rows, row_bytes}), Poisoned({rows, f}), Poisoned({f}), 3.9f, 0.57f};
  ASSERT_TRUE(gpu_->BceGrad(bce).ok());
  EXPECT_LT(RelErr(Down(bce.grad), g), 1e-5);
  EXPECT_LT(RelErr(Down(bce.grad_bias), gb), 1e-5);
  const int n = 100003;
  std::vector<float> w = RandomValues(n, 64), grad = RandomValues(n, 65, 0.1f), m = RandomValues(n, 66, 0.1f), v(n);
  for (int i = 0; i < n; ++i) v[i] = 1e-3f * (1 + i % 7);
  AdamArgs dev{Up(w, DType::kF32, {n}), Up(grad, DType::kF32, {n}), Up(m, DType::kF32, {n}), Up(v, DType::kF32, {n}), 2e-3f, 0.9f, 0.999f,
               1e-8f, 0.271f, 0.00299f};
  ASSERT_TRUE(cpu_.AdamStep({hv(w, DType::kF32, {n}), hv(grad, DType::kF32, {n}), hv(m, DType::kF32, {n}), hv(v, DType::kF32, {n}), 2e-3f,
                             0.9f, 0.999f, 1e-8f, 0.271f, 0.00299f})
                  .ok());
  ASSERT_TRUE(gpu_->AdamStep(dev).ok());
  EXPECT_LT(RelErr(Down(dev.w), w), 1e-6);
  EXPECT_LT(RelErr(Down(dev.m), m), 1e-6);
  EXPECT_LT(RelErr(Down(dev.v), v), 1e-6);
}

// CopyRows (the bundle cache): scattered rows device -> device and pinned -> device, bytewise as
// the CPU's; the rows not named keep their bytes.
TEST_F(CudaTwinTest, CopyRows) {
  for (size_t row_bytes : {size_t{16400}, size_t{8194}, size_t{7}}) {
    const int rows = 64;
    std::vector<unsigned char> src(row_bytes * rows), dst(row_bytes * rows);
    for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 131 + 7), dst[i] = static_cast<unsigned char>(i * 17 + 3);
    const std::vector<int32_t> from = {0, 5, 63, 6, 7, 40}, to = {10, 0, 1, 63, 62, 2};
    std::vector<unsigned char> want = dst;
    ASSERT_TRUE(cpu_.CopyRows(src.data(), want.data(), row_bytes, from, to).ok());
    TensorView dsrc = Up(src, DType::kU8, {static_cast<int64_t>(src.size())}), ddst = Up(dst, DType::kU8, {static_cast<int64_t>(dst.size())});
    ASSERT_TRUE(gpu_->CopyRows(dsrc.data, ddst.data, row_bytes, from, to).ok());
    std::vector<unsigned char> got(dst.size());
    ASSERT_TRUE(gpu_->CopyToHost(got.data(), ddst.data, got.size()).ok());
    EXPECT_EQ(got, want) << row_bytes;
    auto pinned = gpu_->AllocateHost(src.size());
    ASSERT_TRUE(pinned.ok());
    std::memcpy(pinned->data(), src.data(), src.size());
    TensorView ddst2 = Up(dst, DType::kU8, {static_cast<int64_t>(dst.size())});
    ASSERT_TRUE(gpu_->CopyRows(pinned->data(), ddst2.data, row_bytes, from, to).ok());
    ASSERT_TRUE(gpu_->CopyToHost(got.data(), ddst2.data, got.size()).ok());
    EXPECT_EQ(got, want) << "pinned " << row_bytes;
  }
  EXPECT_EQ(gpu_->CopyRows(nullptr, nullptr, 4, {1, 2}, {1}).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::kernels::cuda
