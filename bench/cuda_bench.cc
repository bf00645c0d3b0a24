// CUDA kernel benchmarks, timed with CUDA events (manual time), each reported against the H100's
// measured peaks: HBM ~3.0 TB/s (read + write, device-to-device copy) and fp16 GEMM 766 TFLOP/s.
// Shapes: OPT-6.7B (d 4096, 32 heads x 128, ffn 16384). Skips each benchmark without a GPU.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_backend.h"

namespace ferry::kernels::cuda {
namespace {

constexpr double kHbmBytesPerSecond = 3.0e12;
constexpr double kFp16FlopsPerSecond = 766e12;

CudaBackend* Gpu() {
  static CudaBackend* gpu = [] {
    auto b = CudaBackend::Create();
    return b.ok() ? b->release() : nullptr;
  }();
  return gpu;
}

// A device tensor of random values (fp32 generated on the host, converted when dtype is 16-bit).
// Google Benchmark calls a benchmark several times while it sizes the iteration count, so tensors
// are made once per (dtype, shape, seed) and shared (the GBs of decode-attention KV took most of
// the run's time before); contents are random, never zeros.
struct DevTensor {
  std::shared_ptr<DeviceBuffer> buf;
  TensorView view;
};

DevTensor Random(DType dtype, std::initializer_list<int64_t> shape, uint32_t seed) {
  static std::map<std::tuple<int, std::vector<int64_t>, uint32_t>, DevTensor> made;
  const auto key = std::make_tuple(static_cast<int>(dtype), std::vector<int64_t>(shape), seed);
  if (auto it = made.find(key); it != made.end()) return it->second;
  DevTensor t;
  t.view = TensorView::Contiguous(nullptr, dtype, shape, Device::kCuda);
  // A block of 1M random values repeated (generating GBs of them on the host would take minutes).
  std::vector<float> f(t.view.numel());
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const size_t block = std::min<size_t>(f.size(), size_t{1} << 20);
  for (size_t i = 0; i < block; ++i) f[i] = dist(rng);
  for (size_t i = block; i < f.size(); ++i) f[i] = f[i - block];
  std::vector<char> host(t.view.bytes());
  if (dtype == DType::kI32) {
    std::memcpy(host.data(), f.data(), host.size());
  } else {
    ConvertFromF32(dtype, f.data(), host.data(), f.size());
  }
  t.buf = std::make_shared<DeviceBuffer>(std::move(*Gpu()->Allocate(host.size())));
  (void)Gpu()->CopyToDevice(t.buf->data(), host.data(), host.size());
  t.view.data = t.buf->data();
  made.emplace(key, t);
  return t;
}

DevTensor Ids(const std::vector<int32_t>& ids) {
  DevTensor t;
  t.view = TensorView::Contiguous(nullptr, DType::kI32, {static_cast<int64_t>(ids.size())}, Device::kCuda);
  t.buf = std::make_shared<DeviceBuffer>(std::move(*Gpu()->Allocate(t.view.bytes())));
  (void)Gpu()->CopyToDevice(t.buf->data(), ids.data(), t.view.bytes());
  t.view.data = t.buf->data();
  return t;
}

// Runs `fn` under CUDA events for each iteration (after one warm-up) and sets the manual time.
template <typename Fn>
void TimeLoop(benchmark::State& state, Fn fn) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  if (!fn().ok()) state.SkipWithError("op failed");
  for (auto _ : state) {
    cudaEventRecord(start, Gpu()->stream());
    const absl::Status s = fn();
    cudaEventRecord(stop, Gpu()->stream());
    cudaEventSynchronize(stop);
    if (!s.ok()) {
      state.SkipWithError(std::string(s.message()).c_str());
      break;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms * 1e-3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

// The floor probe: device-to-device copy (read + write), measured in the same run as the kernels.
void BM_HbmCopyProbe(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const size_t bytes = static_cast<size_t>(state.range(0)) << 20;
  auto src = Gpu()->Allocate(bytes);
  auto dst = Gpu()->Allocate(bytes);
  if (!src.ok() || !dst.ok()) return state.SkipWithError("allocation failed");
  cudaMemsetAsync(src->data(), 1, bytes, Gpu()->stream());
  TimeLoop(state, [&]() -> absl::Status {
    if (cudaMemcpyAsync(dst->data(), src->data(), bytes, cudaMemcpyDeviceToDevice, Gpu()->stream()) != cudaSuccess) {
      return absl::InternalError("cudaMemcpyAsync");
    }
    return absl::OkStatus();
  });
  state.counters["GB/s_rw"] = benchmark::Counter(2.0 * bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(2.0 * bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// Decode attention: batch sequences, one query each at the last position of `ctx`.
void BM_DecodeAttention(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t b = state.range(0), ctx = state.range(1), h = 32, hd = 128, w = h * hd;
  const DType kv = state.range(2) != 0 ? DType::kF16 : DType::kF32;  // the cache's type
  DevTensor q = Random(DType::kF32, {b, w}, 1), k = Random(kv, {b, ctx, w}, 2), v = Random(kv, {b, ctx, w}, 3);
  DevTensor out = Random(DType::kF32, {b, w}, 4);
  std::vector<int32_t> seq(b), pos(b, static_cast<int32_t>(ctx - 1));
  for (int64_t i = 0; i < b; ++i) seq[i] = static_cast<int32_t>(i);
  DevTensor dseq = Ids(seq), dpos = Ids(pos);
  AttentionArgs a{q.view, k.view, v.view, dseq.view, dpos.view, out.view, static_cast<int>(h), 0.088f, TensorView{}};
  TimeLoop(state, [&] { return Gpu()->Attention(a); });
  const double bytes = 2.0 * b * ctx * w * DTypeSize(kv);
  state.counters["KV_GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// Prefill attention: `seqs` sequences of `ctx` queries each, causal; tensor_cores = 1 passes the
// host copies of seq_ids/positions that let the backend run 64-query tiles on the tensor cores,
// 0 runs the fp32 per-query kernel.
void BM_PrefillAttention(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t ctx = state.range(0), seqs = state.range(1), h = 32, hd = 128, w = h * hd, n = ctx * seqs;
  DevTensor q = Random(DType::kF32, {n, w}, 1), k = Random(DType::kF32, {seqs, ctx, w}, 2), v = Random(DType::kF32, {seqs, ctx, w}, 3);
  DevTensor out = Random(DType::kF32, {n, w}, 4);
  std::vector<int32_t> seq(n), pos(n);
  for (int64_t i = 0; i < n; ++i) seq[i] = static_cast<int32_t>(i / ctx), pos[i] = static_cast<int32_t>(i % ctx);
  DevTensor dseq = Ids(seq), dpos = Ids(pos);
  AttentionArgs a{q.view, k.view, v.view, dseq.view, dpos.view, out.view, static_cast<int>(h), 0.088f, TensorView{}};
  if (state.range(2) != 0) a.host_seq_ids = seq.data(), a.host_positions = pos.data();
  TimeLoop(state, [&] { return Gpu()->Attention(a); });
  const double flops = 2.0 * seqs * ctx * (ctx + 1) * w;  // QK^T and PV over the causal half
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_fp16_peak"] = benchmark::Counter(flops / kFp16FlopsPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// H2O decode over the slots (OPT-6.7B heads), every slot occupied, probabilities returned.
void BM_SlotAttention(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t b = state.range(0), slots = state.range(1), h = 32, hd = 128, w = h * hd;
  DevTensor q = Random(DType::kF32, {b, w}, 1), k = Random(DType::kF32, {b, h, slots, hd}, 2),
            v = Random(DType::kF32, {b, h, slots, hd}, 3), out = Random(DType::kF32, {b, w}, 4),
            probs = Random(DType::kF32, {b, h, slots}, 5);
  std::vector<int32_t> seq(b);
  for (int64_t i = 0; i < b; ++i) seq[i] = static_cast<int32_t>(i);
  DevTensor dseq = Ids(seq);
  DevTensor occ;
  occ.view = TensorView::Contiguous(nullptr, DType::kU8, {b, h, slots}, Device::kCuda);
  occ.buf = std::make_shared<DeviceBuffer>(std::move(*Gpu()->Allocate(occ.view.bytes())));
  cudaMemsetAsync(occ.buf->data(), 1, occ.view.bytes(), Gpu()->stream());
  occ.view.data = occ.buf->data();
  SlotAttentionArgs a{q.view, k.view, v.view, occ.view, dseq.view, out.view, probs.view, 0.088f};
  TimeLoop(state, [&] { return Gpu()->SlotAttention(a); });
  const double bytes = 2.0 * b * h * slots * hd * 4;
  state.counters["KV_GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// Deja Vu's gathered-row FFN on OPT-6.7B's FFN (d 4096): `neurons` fp16 bundles already on the GPU.
void BM_BundledFfn(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t n = state.range(0), m = state.range(1), d = 4096;
  DevTensor x = Random(DType::kF32, {n, d}, 1), bundles = Random(DType::kF16, {m, 2 * d + 1}, 2), b2 = Random(DType::kF32, {d}, 3),
            out = Random(DType::kF32, {n, d}, 4);
  BundledFfnArgs a{x.view, bundles.view, b2.view, out.view};
  TimeLoop(state, [&] { return Gpu()->BundledFfn(a); });
  const double bytes = 2.0 * m * (2 * d + 1);
  state.counters["bundle_GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// Issue 15: a q4/q8 linear on an [m, k] matrix of random codes (fp16 scales and minimums of 0.01),
// OPT-6.7B's FFN shape. Up to kFusedQuantRows rows the fused kernel, counted in packed bytes (the
// floor of a decode step's GEMV is reading them once); above, dequantize-to-fp16 plus the GEMM.
void BM_QuantLinear(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t n = state.range(0), m = state.range(1), k = state.range(2);
  const QuantFormat f{state.range(3) == 4 ? QuantKind::kQ4 : QuantKind::kQ8, 64};
  static std::map<std::tuple<int64_t, int64_t, int>, DevTensor> regions;
  auto layout = LayoutQuantized(f, m, k);
  if (!layout.ok()) return state.SkipWithError("bad shape");
  auto key = std::make_tuple(m, k, static_cast<int>(f.kind));
  if (!regions.count(key)) {
    std::vector<uint8_t> host(layout->bytes);
    std::mt19937 rng(7);
    for (size_t i = 0; i < layout->values_bytes; ++i) host[i] = static_cast<uint8_t>(rng());
    const uint16_t p = F32ToF16(0.01f);
    for (size_t g = 0; g < static_cast<size_t>(m) * layout->groups_per_row; ++g) {
      std::memcpy(host.data() + layout->scales_offset + 2 * g, &p, 2);
      if (f.kind == QuantKind::kQ4) std::memcpy(host.data() + layout->mins_offset + 2 * g, &p, 2);
    }
    DevTensor t;
    t.buf = std::make_shared<DeviceBuffer>(std::move(*Gpu()->Allocate(host.size())));
    (void)Gpu()->CopyToDevice(t.buf->data(), host.data(), host.size());
    t.view = TensorView::Contiguous(t.buf->data(), DType::kU8, {m, k}, Device::kCuda);
    t.view.quant = f;
    regions.emplace(key, t);
  }
  const DevTensor& w = regions.at(key);
  DevTensor x = Random(DType::kF32, {n, k}, 1), out = Random(DType::kF32, {n, m}, 2);
  LinearArgs a{x.view, w.view, TensorView{}, out.view, false};
  TimeLoop(state, [&] { return Gpu()->Linear(a); });
  const double bytes = static_cast<double>(layout->bytes), flops = 2.0 * n * m * k;
  state.counters["packed_GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_fp16_peak"] = benchmark::Counter(flops / kFp16FlopsPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_LayerNorm(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t rows = state.range(0), d = 4096;
  DevTensor x = Random(DType::kF32, {rows, d}, 1), g = Random(DType::kF32, {d}, 2), b = Random(DType::kF32, {d}, 3),
            y = Random(DType::kF32, {rows, d}, 4);
  LayerNormArgs a{x.view, g.view, b.view, y.view, 1e-5f};
  TimeLoop(state, [&] { return Gpu()->LayerNorm(a); });
  const double bytes = 2.0 * rows * d * 4;  // read + write
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// The Llama-family ops at Llama-3-8B shapes (d 4096, 32 query and 8 KV heads of 128, ffn 14336).
void BM_RmsNorm(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t rows = state.range(0), d = 4096;
  DevTensor x = Random(DType::kF32, {rows, d}, 1), g = Random(DType::kF32, {d}, 2), y = Random(DType::kF32, {rows, d}, 4);
  RmsNormArgs a{x.view, g.view, y.view, 1e-5f};
  TimeLoop(state, [&] { return Gpu()->RmsNorm(a); });
  const double bytes = 2.0 * rows * d * 4;  // read + write
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// q (32 heads) and k (8 heads) rotated in place, as a layer does.
void BM_Rope(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t rows = state.range(0), hd = 128;
  DevTensor q = Random(DType::kF32, {rows, 32 * hd}, 5), k = Random(DType::kF32, {rows, 8 * hd}, 6),
            f = Random(DType::kF32, {1, hd / 2}, 7);
  std::vector<int32_t> pos(rows);
  for (int64_t i = 0; i < rows; ++i) pos[i] = static_cast<int32_t>(i % 8192);
  auto dpos = Gpu()->Allocate(rows * 4);
  (void)Gpu()->CopyToDevice(dpos->data(), pos.data(), rows * 4);
  const TensorView pv = TensorView::Contiguous(dpos->data(), DType::kI32, {rows}, Device::kCuda);
  RopeArgs aq{q.view, pv, f.view, TensorView{}, 32, static_cast<int>(hd), 1.0f}, ak{k.view, pv, f.view, TensorView{}, 8, static_cast<int>(hd), 1.0f};
  TimeLoop(state, [&]() -> absl::Status {
    FERRY_RETURN_IF_ERROR(Gpu()->Rope(aq));
    return Gpu()->Rope(ak);
  });
  const double bytes = 2.0 * rows * 40 * hd * 4;  // q and k read and written
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_SiluMul(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t rows = state.range(0), f = 14336;
  DevTensor g = Random(DType::kF32, {rows, f}, 8), u = Random(DType::kF32, {rows, f}, 9);
  SiluMulArgs a{g.view, u.view, g.view};
  TimeLoop(state, [&] { return Gpu()->SiluMul(a); });
  const double bytes = 3.0 * rows * f * 4;  // two reads, one write
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_HBM"] = benchmark::Counter(bytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

// The layer's GEMMs: [batch, k] x [m, k]^T, fp16 weights, with bias (and ReLU where relu = 1);
// above 128 rows epilogue = 1 runs bias and ReLU in cuBLASLt's epilogue, 0 as a separate pass.
void BM_Gemm(benchmark::State& state) {
  if (Gpu() == nullptr) return state.SkipWithError("no CUDA device");
  const int64_t n = state.range(0), m = state.range(1), k = state.range(2);
  const bool relu = state.range(3) != 0, epilogue = state.range(4) != 0;
  DevTensor x = Random(DType::kF32, {n, k}, 1), w = Random(DType::kF16, {m, k}, 2), bias = Random(DType::kF32, {m}, 3),
            y = Random(DType::kF32, {n, m}, 4);
  LinearArgs a{x.view, w.view, bias.view, y.view, relu};
  Gpu()->set_gemm_epilogue(epilogue);
  TimeLoop(state, [&] { return Gpu()->Linear(a); });
  Gpu()->set_gemm_epilogue(true);
  const double flops = 2.0 * n * m * k, wbytes = 2.0 * m * k;
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_of_fp16_peak"] = benchmark::Counter(flops / kFp16FlopsPerSecond, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_frac_of_HBM"] = benchmark::Counter(wbytes / kHbmBytesPerSecond, benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_HbmCopyProbe)->ArgNames({"MiB"})->Args({1024})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeAttention)->ArgNames({"batch", "ctx", "f16"})->Args({64, 512, 0})->Args({64, 1024, 0})->Args({64, 2048, 0})
    ->Args({64, 2048, 1})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_PrefillAttention)->ArgNames({"ctx", "seqs", "tensor_cores"})->Args({512, 1, 0})->Args({512, 32, 0})
    ->Args({512, 32, 1})->Args({2048, 1, 1})->Args({2048, 8, 1})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SlotAttention)->ArgNames({"batch", "slots"})->Args({64, 103})->Args({256, 103})->Args({64, 545})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_BundledFfn)->ArgNames({"batch", "neurons"})->Args({1, 2458})->Args({1, 16384})->Args({16, 2458})->Args({64, 8192})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_QuantLinear)->ArgNames({"batch", "m", "k", "bits"})
    ->Args({1, 16384, 4096, 4})->Args({8, 16384, 4096, 4})->Args({16, 16384, 4096, 4})->Args({1, 16384, 4096, 8})
    ->Args({64, 16384, 4096, 4})->Args({512, 16384, 4096, 4})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_LayerNorm)->ArgNames({"rows"})->Args({64})->Args({4096})->Args({32768})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_RmsNorm)->ArgNames({"rows"})->Args({64})->Args({4096})->Args({32768})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Rope)->ArgNames({"rows"})->Args({64})->Args({4096})->Args({32768})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SiluMul)->ArgNames({"rows"})->Args({64})->Args({4096})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gemm)->ArgNames({"batch", "m", "k", "relu", "epilogue"})
    ->Args({1, 4096, 4096, 0, 1})->Args({1, 16384, 4096, 1, 1})->Args({8, 16384, 4096, 1, 1})->Args({32, 16384, 4096, 1, 1})
    ->Args({64, 16384, 4096, 1, 1})->Args({128, 16384, 4096, 1, 1})->Args({512, 16384, 4096, 1, 1})
    ->Args({512, 16384, 4096, 1, 0})->Args({512, 4096, 16384, 0, 1})->Args({512, 4096, 16384, 0, 0})
    ->Args({4096, 16384, 4096, 1, 1})->Args({4096, 16384, 4096, 1, 0})
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace ferry::kernels::cuda
