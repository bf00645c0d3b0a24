// Every CUDA op against its CPU twin on fresh random inputs of odd and large shapes, outputs
// poisoned with NaN before the run so an unwritten element fails. Tolerances by dtype: fp32 paths
// 1e-5 relative; GEMMs whose activations are rounded to fp16 (bf16) 2e-3 (1.6e-2) relative to the
// output's largest magnitude. Skips (GTEST_SKIP) where no GPU is visible, as on CI machines.
#include "kernels/cuda/cuda_backend.h"

#include <cmath>
#include <cstring>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "test_util.h"

namespace ferry::kernels::cuda {
namespace {

using ferry::testing::RandomValues;

class CudaTwinTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (VisibleDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    auto b = CudaBackend::Create();
    ASSERT_TRUE(b.ok()) << b.status();
    gpu_ = std::move(*b);
  }

  // Uploads host bytes; returns a device view of the given shape and dtype.
  TensorView Up(const void* host, DType dtype, std::initializer_list<int64_t> shape) {
    TensorView v = TensorView::Contiguous(nullptr, dtype, shape, Device::kCuda);
    auto buf = gpu_->Allocate(v.bytes());
    EXPECT_TRUE(buf.ok());
    EXPECT_TRUE(gpu_->CopyToDevice(buf->data(), host, v.bytes()).ok());
    v.data = buf->data();
    buffers_.push_back(std::move(*buf));
    return v;
  }
  template <typename T>
  TensorView Up(const std::vector<T>& host, DType dtype, std::initializer_list<int64_t> shape) {
    return Up(static_cast<const void*>(host.data()), dtype, shape);
  }
  // A device output poisoned with NaN.
  TensorView Poisoned(std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> nan(n, NAN);
    return Up(nan, DType::kF32, shape);
  }
  std::vector<float> Down(const TensorView& v) {
    std::vector<float> host(v.numel());
    EXPECT_TRUE(gpu_->CopyToHost(host.data(), v.data, v.bytes()).ok());
    return host;
  }
  static double RelErr(const std::vector<float>& got, const std::vector<float>& ref) {
    double diff = 0, mag = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      if (std::isnan(got[i])) return INFINITY;
      diff = std::max(diff, static_cast<double>(std::abs(got[i] - ref[i])));
      mag = std::max(mag, static_cast<double>(std::abs(ref[i])));
    }
    return diff / std::max(mag, 1e-30);
  }

  std::unique_ptr<CudaBackend> gpu_;
  CpuBackend cpu_;
  std::vector<DeviceBuffer> buffers_;
};

TEST_F(CudaTwinTest, Linear) {
  struct Case { DType dtype; int n, m, k; bool relu; double tol; };
  for (const Case& c : {Case{DType::kF32, 1, 1, 1, false, 1e-5}, Case{DType::kF32, 7, 33, 129, true, 1e-5},
                        Case{DType::kF16, 1, 4097, 4096, false, 2e-3}, Case{DType::kF16, 67, 1031, 259, true, 2e-3},
                        Case{DType::kF16, 512, 16384, 4096, true, 2e-3}, Case{DType::kBF16, 13, 515, 777, false, 1.6e-2}}) {
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
    ASSERT_TRUE(gpu_->Linear(dev).ok());
    EXPECT_LT(RelErr(Down(dev.out), ref), c.tol) << DTypeName(c.dtype) << " " << c.n << "x" << c.m << "x" << c.k;
  }
}

TEST_F(CudaTwinTest, GatherLayerNormAdd) {
  for (auto [rows, dim] : {std::pair<int, int>{1, 1}, {37, 255}, {300, 4096}, {5, 12288}}) {
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
