// CPU kernel benchmarks: linear (GFLOP/s and weight GB/s) and attention (GFLOP/s, KV GB/s) at
// tiny-opt shapes and OPT-6.7B shapes. Inputs are random; the CPU backend is the reference
// implementation, so these numbers say what the reference costs, not what a GPU will do.
#include <benchmark/benchmark.h>

#include <random>
#if defined(__FMA__)
#include <immintrin.h>
#endif
#include <vector>

#include "base/thread_pool.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Args: tokens, out features (m), in features (k), weight dtype (0 f32, 1 f16).
void BM_Linear(benchmark::State& state) {
  const int64_t n = state.range(0), m = state.range(1), k = state.range(2);
  const DType wdtype = state.range(3) == 0 ? DType::kF32 : DType::kF16;
  std::vector<float> x = Random(n * k, 1), wf = Random(m * k, 2), bias = Random(m, 3), y(n * m);
  std::vector<uint16_t> wh(m * k);
  ConvertFromF32(DType::kF16, wf.data(), wh.data(), wh.size());
  LinearArgs a;
  a.in = TensorView::Contiguous(x.data(), DType::kF32, {n, k});
  a.weight = TensorView::Contiguous(wdtype == DType::kF32 ? static_cast<void*>(wf.data()) : wh.data(), wdtype, {m, k});
  a.bias = TensorView::Contiguous(bias.data(), DType::kF32, {m});
  a.out = TensorView::Contiguous(y.data(), DType::kF32, {n, m});
  for (auto _ : state) {
    CpuLinear(ThreadPool::Default(), a);
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = 2.0 * n * m * k;
  state.counters["GFLOP"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight_GB"] =
      benchmark::Counter(m * k * DTypeSize(wdtype) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Args: batch, context, heads, head_dim; decode (one query per sequence at the last position).
void BM_DecodeAttention(benchmark::State& state) {
  const int64_t b = state.range(0), ctx = state.range(1), h = state.range(2), hd = state.range(3), w = h * hd;
  std::vector<float> q = Random(b * w, 1), kc = Random(b * ctx * w, 2), vc = Random(b * ctx * w, 3), out(b * w);
  std::vector<int32_t> seq(b), pos(b, static_cast<int32_t>(ctx - 1));
  for (int64_t i = 0; i < b; ++i) seq[i] = static_cast<int32_t>(i);
  AttentionArgs a;
  a.q = TensorView::Contiguous(q.data(), DType::kF32, {b, w});
  a.k_cache = TensorView::Contiguous(kc.data(), DType::kF32, {b, ctx, w});
  a.v_cache = TensorView::Contiguous(vc.data(), DType::kF32, {b, ctx, w});
  a.seq_ids = TensorView::Contiguous(seq.data(), DType::kI32, {b});
  a.positions = TensorView::Contiguous(pos.data(), DType::kI32, {b});
  a.out = TensorView::Contiguous(out.data(), DType::kF32, {b, w});
  a.num_heads = static_cast<int>(h);
  a.scale = 0.125f;
  for (auto _ : state) {
    CpuAttention(ThreadPool::Default(), a);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOP"] = benchmark::Counter(4.0 * b * ctx * w * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["KV_GB"] = benchmark::Counter(2.0 * b * ctx * w * 4 * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Prefill: `ctx` queries of one sequence, causal.
void BM_PrefillAttention(benchmark::State& state) {
  const int64_t ctx = state.range(0), h = state.range(1), hd = state.range(2), w = h * hd;
  std::vector<float> q = Random(ctx * w, 1), kc = Random(ctx * w, 2), vc = Random(ctx * w, 3), out(ctx * w);
  std::vector<int32_t> seq(ctx, 0), pos(ctx);
  for (int64_t i = 0; i < ctx; ++i) pos[i] = static_cast<int32_t>(i);
  AttentionArgs a;
  a.q = TensorView::Contiguous(q.data(), DType::kF32, {ctx, w});
  a.k_cache = TensorView::Contiguous(kc.data(), DType::kF32, {1, ctx, w});
  a.v_cache = TensorView::Contiguous(vc.data(), DType::kF32, {1, ctx, w});
  a.seq_ids = TensorView::Contiguous(seq.data(), DType::kI32, {ctx});
  a.positions = TensorView::Contiguous(pos.data(), DType::kI32, {ctx});
  a.out = TensorView::Contiguous(out.data(), DType::kF32, {ctx, w});
  a.num_heads = static_cast<int>(h);
  a.scale = 0.125f;
  for (auto _ : state) {
    CpuAttention(ThreadPool::Default(), a);
    benchmark::DoNotOptimize(out.data());
  }
  // Causal: about half the score matrix.
  state.counters["GFLOP"] = benchmark::Counter(2.0 * ctx * (ctx + 1) * w * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Floors measured in the same run: the host's read bandwidth (all threads summing a 512 MiB array)
// and its fp32 FMA peak (all threads, independent register accumulators).
void BM_FloorHostRead(benchmark::State& state) {
  const int64_t n = int64_t{128} << 20;  // floats
  std::vector<float> data = Random(n, 9);
  ThreadPool& pool = ThreadPool::Default();
  for (auto _ : state) {
    std::vector<float> partial(pool.size() * 4 * 16, 0.0f);
    pool.ParallelFor(n / 64, 1024, [&](int64_t b, int64_t e) {
      float acc[16] = {};
      for (int64_t i = b * 64; i < e * 64; i += 16)
        for (int l = 0; l < 16; ++l) acc[l] += data[i + l];
      for (int l = 0; l < 16; ++l) partial[(b / 1024 % (pool.size() * 4)) * 16 + l] += acc[l];
    });
    benchmark::DoNotOptimize(partial.data());
  }
  state.counters["GB"] = benchmark::Counter(n * 4 * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_FloorFmaPeak(benchmark::State& state) {
  ThreadPool& pool = ThreadPool::Default();
  const int64_t iters = 1 << 22;
  for (auto _ : state) {
    pool.ParallelFor(pool.size(), 1, [&](int64_t b, int64_t e) {
#if defined(__FMA__)
      __m256 acc[10];
      for (int i = 0; i < 10; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i + b));
      const __m256 m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-7f);
      for (int64_t it = 0; it < iters; ++it)
        for (int i = 0; i < 10; ++i) acc[i] = _mm256_fmadd_ps(acc[i], m, a);
#else
      typedef float V8 __attribute__((vector_size(32)));
      V8 acc[10];
      for (int i = 0; i < 10; ++i) acc[i] = V8{} + static_cast<float>(i + b);
      const V8 m = V8{} + 0.999999f, a = V8{} + 1e-7f;
      for (int64_t it = 0; it < iters; ++it)
        for (int i = 0; i < 10; ++i) acc[i] = acc[i] * m + a;
#endif
      for (int i = 0; i < 10; ++i) benchmark::DoNotOptimize(acc[i]);
    });
  }
  // mul + add per lane: 2 flops x 8 lanes x 10 accumulators per iteration per thread.
  state.counters["GFLOP"] = benchmark::Counter(2.0 * 8 * 10 * iters * pool.size() * 1e-9,
                                               benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_FloorHostRead)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_FloorFmaPeak)->Unit(benchmark::kMillisecond)->UseRealTime();

// tiny-opt: d 256, ffn 1024, vocab 8192. OPT-6.7B: d 4096, ffn 16384.
BENCHMARK(BM_Linear)
    ->ArgNames({"n", "m", "k", "f16"})
    ->Args({1, 256, 256, 1})
    ->Args({16, 256, 256, 1})
    ->Args({16, 1024, 256, 1})
    ->Args({16, 256, 1024, 1})
    ->Args({16, 8192, 256, 1})
    ->Args({512, 1024, 256, 1})
    ->Args({512, 8192, 256, 1})
    ->Args({1, 16384, 4096, 1})
    ->Args({1, 16384, 4096, 0})
    ->Args({32, 16384, 4096, 1})
    ->Args({32, 4096, 16384, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_DecodeAttention)
    ->ArgNames({"batch", "ctx", "heads", "hd"})
    ->Args({16, 40, 8, 32})
    ->Args({16, 512, 8, 32})
    ->Args({16, 512, 32, 128})
    ->Args({8, 512, 32, 128})
    ->Args({8, 2048, 32, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_PrefillAttention)
    ->ArgNames({"ctx", "heads", "hd"})
    ->Args({512, 8, 32})
    ->Args({512, 32, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace ferry::kernels
