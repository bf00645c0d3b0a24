#include "kernels/cpu/cpu_backend.h"

#include "base/quant.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sys/mman.h>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/thread_pool.h"

namespace ferry::kernels {
namespace {

constexpr size_t kAlignment = 64;

size_t Round64(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

// `bytes` rounded up to `small`, aligned to `small`; from 2 MiB on, to 2 MiB and advised to take
// transparent huge pages (the kernel's "madvise" mode gives none otherwise). nullptr on failure.
void* AllocateAligned(size_t bytes, size_t small) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t align = bytes >= kHuge ? kHuge : small;
  const size_t rounded = std::max<size_t>((bytes + small - 1) / small * small, small);
  void* p = nullptr;
  if (::posix_memalign(&p, align, rounded) != 0) return nullptr;
  if (align == kHuge) (void)::madvise(p, rounded / kHuge * kHuge, MADV_HUGEPAGE);  // advice: without THP the pages stay small
  return p;
}

// Checks that every id is in [0, limit); returns the first bad one.
absl::Status CheckIds(const char* op, const char* what, const TensorView& ids, int64_t offset, int64_t limit) {
  const int32_t* p = ids.as<const int32_t>();
  for (int64_t i = 0; i < ids.shape[0]; ++i) {
    const int64_t v = static_cast<int64_t>(p[i]) + offset;
    if (v < 0 || v >= limit) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, "[", i, "] = ", p[i], " is outside [0, ",
                                                     limit - offset, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// The sum over a KV head's `group` query heads of element j of their rows of `stride` floats
// (rows consecutive from `rows`), in head order: H2O's score of a shared slot.
static float GroupSum(const float* rows, int64_t group, int64_t stride, int64_t j) {
  float s = rows[j];
  for (int64_t g = 1; g < group; ++g) s += rows[g * stride + j];
  return s;
}

class DoneFence final : public Fence {
 public:
  absl::Status Wait() override { return absl::OkStatus(); }
};

CpuBackend::CpuBackend() : pool_(&ThreadPool::Default()) {}

CpuBackend::CpuBackend(const CpuBackendOptions& options) : pool_(&ThreadPool::Default()) {
  device_.budget = options.device_budget_bytes;
  host_.budget = options.host_budget_bytes;
}

absl::StatusOr<DeviceBuffer> CpuBackend::AllocateIn(Pool& pool, size_t bytes, bool host) {
  size_t now = pool.allocated.fetch_add(bytes) + bytes;
  if (pool.budget > 0 && now > pool.budget) {
    pool.allocated.fetch_sub(bytes);
    return absl::ResourceExhaustedError(absl::StrCat("cpu backend: allocating ", bytes, " bytes of ", host ? "host" : "device",
                                                     " memory would exceed the budget of ", pool.budget, " (",
                                                     now - bytes, " in use)"));
  }
  // 4 KiB alignment: staging buffers take O_DIRECT reads. A buffer of 2 MiB or more starts on a
  // 2 MiB boundary and asks for transparent huge pages: on the dev VM O_DIRECT reads into 4 KiB
  // pages ran at 1.0-1.5 GB/s and into huge pages at 2.2-2.5, and pinned host memory is what it
  // stands in for. The size is not rounded up past the small alignment (the budget counts what is
  // asked; the tail is small pages).
  void* p = AllocateAligned(bytes, host ? 4096 : kAlignment);
  if (p == nullptr) {
    pool.allocated.fetch_sub(bytes);
    return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", bytes, " bytes"));
  }
  // Resident from the start, as the memory it stands in for is (cudaMalloc'd device memory, pinned
  // host memory): the page faults of the first touch happen here, not in the first forward (they
  // were a third of a cold prefill's time on the 2-core VM).
  for (size_t at = 0; at < bytes; at += 4096) static_cast<volatile char*>(p)[at] = 0;
  size_t peak = pool.peak.load();
  while (now > peak && !pool.peak.compare_exchange_weak(peak, now)) {
  }
  return DeviceBuffer(this, p, bytes, host);
}

CpuBackend::Scratch::~Scratch() { std::free(data_); }

absl::StatusOr<char*> CpuBackend::Scratch::Get(size_t bytes) {
  if (bytes <= bytes_ && data_ != nullptr) return data_;
  std::free(data_);
  data_ = static_cast<char*>(AllocateAligned(bytes, kAlignment));
  bytes_ = data_ != nullptr ? bytes : 0;
  if (data_ == nullptr) return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", bytes, " bytes of scratch"));
  return data_;
}

absl::StatusOr<DeviceBuffer> CpuBackend::Allocate(size_t bytes) { return AllocateIn(device_, bytes, false); }
absl::StatusOr<DeviceBuffer> CpuBackend::AllocateHost(size_t bytes) { return AllocateIn(host_, bytes, true); }

void CpuBackend::Free(void* data, size_t bytes, bool host) {
  std::free(data);
  (host ? host_ : device_).allocated.fetch_sub(bytes);
}

absl::Status CpuBackend::TransferToDevice(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::TransferWithinDevice(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Fence>> CpuBackend::RecordFence() { return std::unique_ptr<Fence>(new DoneFence()); }

absl::Status CpuBackend::CopyToDevice(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyToHost(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::GatherRows(const GatherRowsArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateGatherRows(a));
  FERRY_RETURN_IF_ERROR(CheckIds("GatherRows", "ids", a.ids, a.offset, a.table.shape[0]));
  const int64_t n = a.out.shape[0], dim = a.out.shape[1];
  const size_t row_bytes = static_cast<size_t>(dim) * DTypeSize(a.table.dtype);
  const int32_t* ids = a.ids.as<const int32_t>();
  pool_->ParallelFor(n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const char* row = a.table.as<const char>() + static_cast<size_t>(ids[i] + a.offset) * row_bytes;
      ConvertToF32(a.table.dtype, row, a.out.as<float>() + i * dim, static_cast<size_t>(dim));
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::LayerNorm(const LayerNormArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateLayerNorm(a));
  const int64_t n = a.in.shape[0], dim = a.in.shape[1];
  const float* gamma = a.gamma.as<const float>();
  const float* beta = a.beta.as<const float>();
  pool_->ParallelFor(n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = a.in.as<const float>() + i * dim;
      float* y = a.out.as<float>() + i * dim;
      double sum = 0.0;
      for (int64_t j = 0; j < dim; ++j) sum += x[j];
      const double mean = sum / static_cast<double>(dim);
      double var = 0.0;
      for (int64_t j = 0; j < dim; ++j) {
        const double d = x[j] - mean;
        var += d * d;
      }
      var /= static_cast<double>(dim);
      const float inv = static_cast<float>(1.0 / std::sqrt(var + a.eps));
      const float m = static_cast<float>(mean);
      for (int64_t j = 0; j < dim; ++j) y[j] = (x[j] - m) * inv * gamma[j] + beta[j];
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::Linear(const LinearArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateLinear(a));
  CpuLinear(*pool_, a);
  return absl::OkStatus();
}

absl::Status CpuBackend::AddLayerNorm(const AddLayerNormArgs& a) {
  // The two ops in turn: the same bits as the unfused pair (the CPU gains nothing from fusing).
  FERRY_RETURN_IF_ERROR(ValidateAddLayerNorm(a));
  FERRY_RETURN_IF_ERROR(Add(a.residual, a.delta, a.residual));
  return LayerNorm({a.residual, a.gamma, a.beta, a.out, a.eps});
}

absl::Status CpuBackend::CopyTensor(const TensorView& src, const TensorView& dst) {
  FERRY_RETURN_IF_ERROR(ValidateCopy(src, dst));
  std::memcpy(dst.data, src.data, src.bytes());
  return absl::OkStatus();
}

absl::Status CpuBackend::Add(const TensorView& a, const TensorView& b, const TensorView& out) {
  FERRY_RETURN_IF_ERROR(ValidateAdd(a, b, out));
  const float* x = a.as<const float>();
  const float* y = b.as<const float>();
  float* z = out.as<float>();
  pool_->ParallelFor(a.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) z[i] = x[i] + y[i];
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::KvWrite(const KvWriteArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateKvWrite(a));
  FERRY_RETURN_IF_ERROR(CheckIds("KvWrite", "seq_ids", a.seq_ids, 0, a.k_cache.shape[0]));
  FERRY_RETURN_IF_ERROR(CheckIds("KvWrite", "positions", a.positions, 0, a.k_cache.shape[1]));
  const int64_t n = a.k.shape[0], width = a.k.shape[1], max_len = a.k_cache.shape[1];
  const int32_t* seq = a.seq_ids.as<const int32_t>();
  const int32_t* pos = a.positions.as<const int32_t>();
  if (a.k_cache.quant) {  // q8/q4: each token's row quantized group by group
    const QuantLayout layout = KvQuantLayout(a.k_cache);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = static_cast<int64_t>(seq[i]) * max_len + pos[i];
      QuantizeSpan(*a.k_cache.quant, layout, a.k.as<const float>() + i * width, width, row, 0, width, a.k_cache.as<uint8_t>());
      QuantizeSpan(*a.v_cache.quant, layout, a.v.as<const float>() + i * width, width, row, 0, width, a.v_cache.as<uint8_t>());
    }
    return absl::OkStatus();
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = (static_cast<int64_t>(seq[i]) * max_len + pos[i]) * width;
    const size_t esize = DTypeSize(a.k_cache.dtype);  // F32, or F16 rounded to nearest
    ConvertFromF32(a.k_cache.dtype, a.k.as<const float>() + i * width, a.k_cache.as<char>() + slot * esize, width);
    ConvertFromF32(a.v_cache.dtype, a.v.as<const float>() + i * width, a.v_cache.as<char>() + slot * esize, width);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Attention(const AttentionArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateAttention(a));
  FERRY_RETURN_IF_ERROR(CheckIds("Attention", "seq_ids", a.seq_ids, 0, a.k_cache.shape[0]));
  FERRY_RETURN_IF_ERROR(CheckIds("Attention", "positions", a.positions, 0, a.k_cache.shape[1]));
  if (a.q.shape[1] / a.num_heads > 1024) return absl::InvalidArgumentError("cpu attention: head_dim above 1024");
  CpuAttention(*pool_, a);
  return absl::OkStatus();
}

absl::Status CpuBackend::BundledFfn(const BundledFfnArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateBundledFfn(a));
  const int64_t n = a.x.shape[0], d = a.x.shape[1], m = a.bundles.shape[0], width = a.bundles.shape[1];  // row stride
  const DType dt = a.bundles.quant ? DType::kF32 : a.bundles.dtype;  // quantized bundles unbundle as fp32
  const size_t es = DTypeSize(dt);
  // Unbundled into the dense layouts (FC1 rows [m, d], FC1 bias [m], FC2 [d, m]) and run through
  // the same Linear kernels as the dense FFN: with every neuron in order the result is the dense
  // FFN's, bit for bit (quantized bundles: the dense FFN of their dequantized values).
  // Scratch every value of which is written before it is read: not zeroed (a memset of the two
  // matrices per call was a visible share of a decode step), and kept from call to call.
  const size_t w1_bytes = Round64(static_cast<size_t>(m * d) * es), b1_bytes = Round64(static_cast<size_t>(m) * sizeof(float));
  const size_t act_bytes = Round64(static_cast<size_t>(n * m) * sizeof(float));
  const size_t cols_bytes = a.bundles.quant ? Round64(static_cast<size_t>(m * d) * sizeof(float)) : 0;
  std::lock_guard<std::mutex> lock(ffn_mu_);
  FERRY_ASSIGN_OR_RETURN(char* const scratch, ffn_scratch_.Get(2 * w1_bytes + b1_bytes + act_bytes + cols_bytes));
  char* const w1 = scratch;
  char* const w2 = w1 + w1_bytes;
  float* const b1 = reinterpret_cast<float*>(w2 + w1_bytes);
  float* const act = reinterpret_cast<float*>(reinterpret_cast<char*>(b1) + b1_bytes);
  float* const cols = reinterpret_cast<float*>(reinterpret_cast<char*>(act) + act_bytes);
  const char* src = a.bundles.as<const char>();
  if (a.bundles.quant) {
    auto layout = LayoutQuantBundle(*a.bundles.quant, d);
    FERRY_CHECK(layout.ok());  // ValidateBundledFfn checked it
    pool_->ParallelFor(m, 16, [&](int64_t j0, int64_t j1) {
      std::vector<float> row(static_cast<size_t>(2 * d));
      for (int64_t j = j0; j < j1; ++j) {
        const uint8_t* bundle = a.bundles.as<const uint8_t>() + static_cast<size_t>(j * width);
        DequantizeSpan(*a.bundles.quant, layout->row, bundle, 2 * d, 0, 0, 2 * d, row.data());
        std::memcpy(w1 + static_cast<size_t>(j * d) * es, row.data(), static_cast<size_t>(d) * es);
        std::memcpy(cols + j * d, row.data() + d, static_cast<size_t>(d) * sizeof(float));
        std::memcpy(&b1[j], bundle + layout->bias_offset, sizeof(float));
      }
    });
    float* w2f = reinterpret_cast<float*>(w2);
    pool_->ParallelFor(d, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t j = 0; j < m; ++j) {
        for (int64_t i = i0; i < i1; ++i) w2f[i * m + j] = cols[j * d + i];
      }
    });
  } else {
    pool_->ParallelFor(m, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const char* bundle = src + static_cast<size_t>(j * width) * es;
        std::memcpy(w1 + static_cast<size_t>(j * d) * es, bundle, static_cast<size_t>(d) * es);
        ConvertToF32(dt, bundle + static_cast<size_t>(d) * es, &b1[j], 1);
      }
    });
    // FC2's columns transposed into its rows in 64 x 64 tiles (a strided read per value was most
    // of the op's time at decode batch sizes).
    constexpr int64_t kTile = 64;
    pool_->ParallelFor((d + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t ib = t0; ib < t1; ++ib) {
        const int64_t i0 = ib * kTile, i1 = std::min(d, i0 + kTile);
        for (int64_t j0 = 0; j0 < m; j0 += kTile) {
          const int64_t j1 = std::min(m, j0 + kTile);
          for (int64_t i = i0; i < i1; ++i) {
            char* dst = w2 + static_cast<size_t>(i * m) * es;
            if (es == 2) {
              for (int64_t j = j0; j < j1; ++j) {
                std::memcpy(dst + static_cast<size_t>(j) * 2, src + static_cast<size_t>(j * width + d + 1 + i) * 2, 2);
              }
            } else {
              for (int64_t j = j0; j < j1; ++j) {
                std::memcpy(dst + static_cast<size_t>(j) * es, src + static_cast<size_t>(j * width + d + 1 + i) * es, es);
              }
            }
          }
        }
      }
    });
  }
  if (m > 0) {
    CpuLinear(*pool_, {a.x, TensorView::Contiguous(w1, dt, {m, d}), TensorView::Contiguous(b1, DType::kF32, {m}),
                       TensorView::Contiguous(act, DType::kF32, {n, m}), true});
    CpuLinear(*pool_, {TensorView::Contiguous(act, DType::kF32, {n, m}), TensorView::Contiguous(w2, dt, {d, m}),
                       a.fc2_bias, a.out, false});
    return absl::OkStatus();
  }
  const float* bias = a.fc2_bias.data != nullptr ? a.fc2_bias.as<const float>() : nullptr;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d; ++i) a.out.as<float>()[t * d + i] = bias != nullptr ? bias[i] : 0.0f;
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SampleRows(const SampleRowsArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSampleRows(a));
  const int64_t rows = a.logits.shape[0], vocab = a.logits.shape[1];
  pool_->ParallelFor(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      a.ids.as<int32_t>()[r] = SampleFromLogits(a.logits.as<const float>() + r * vocab, static_cast<int>(vocab), a.params, a.uniforms[r]);
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::ArgMaxRows(const TensorView& logits, const TensorView& ids) {
  FERRY_RETURN_IF_ERROR(ValidateArgMaxRows(logits, ids));
  const int64_t rows = logits.shape[0], vocab = logits.shape[1];
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits.as<const float>() + r * vocab;
    int64_t best = 0;
    for (int64_t j = 1; j < vocab; ++j) {
      if (row[j] > row[best]) best = j;
    }
    ids.as<int32_t>()[r] = static_cast<int32_t>(best);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SlotKvWrite(const SlotKvWriteArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSlotKvWrite(a));
  FERRY_RETURN_IF_ERROR(CheckIds("SlotKvWrite", "seq_ids", a.seq_ids, 0, a.k_slots.shape[0]));
  const int64_t n = a.k.shape[0], width = a.k.shape[1], heads = a.k_slots.shape[1], slots = a.k_slots.shape[2],
                hd = a.k_slots.shape[3];
  const int32_t* seq = a.seq_ids.as<const int32_t>();
  const int32_t* slot = a.slot_ids.as<const int32_t>();
  for (int64_t i = 0; i < n * heads; ++i) {
    if (slot[i] < -1 || slot[i] >= slots) return absl::InvalidArgumentError("SlotKvWrite: slot id out of range");
  }
  if ((a.k.dtype != a.k_slots.dtype || a.k_slots.quant) && hd > 1024) return absl::InvalidArgumentError("SlotKvWrite: head_dim above 1024");
  if (a.k_slots.quant) {  // q8/q4 slots: each kept (token, head) quantized from its fp32 values
    const QuantLayout layout = KvQuantLayout(a.k_slots);
    const size_t in_size = DTypeSize(a.k.dtype);
    float row[1024];
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        if (slot[i * heads + h] < 0) continue;
        const int64_t dst_row = (static_cast<int64_t>(seq[i]) * heads + h) * slots + slot[i * heads + h];
        for (const auto& [in, out] : {std::pair{&a.k, &a.k_slots}, std::pair{&a.v, &a.v_slots}}) {
          ConvertToF32(in->dtype, in->as<const char>() + (i * width + h * hd) * in_size, row, hd);
          QuantizeSpan(*out->quant, layout, row, hd, dst_row, 0, hd, out->as<uint8_t>());
        }
      }
    }
    return absl::OkStatus();
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      if (slot[i * heads + h] < 0) continue;  // not kept
      const int64_t dst = ((static_cast<int64_t>(seq[i]) * heads + h) * slots + slot[i * heads + h]) * hd;
      const size_t esize = DTypeSize(a.k_slots.dtype), in_size = DTypeSize(a.k.dtype);
      for (const auto& [in, out] : {std::pair{&a.k, &a.k_slots}, std::pair{&a.v, &a.v_slots}}) {
        const char* src = in->as<const char>() + (i * width + h * hd) * in_size;
        char* to = out->as<char>() + dst * esize;
        if (in->dtype == out->dtype) {
          std::memcpy(to, src, hd * esize);
        } else {  // F16 -> F32 is exact; F32 -> F16 rounds to nearest
          float row[1024];
          ConvertToF32(in->dtype, src, row, hd);
          ConvertFromF32(out->dtype, row, to, hd);
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SlotAttention(const SlotAttentionArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateSlotAttention(a));
  FERRY_RETURN_IF_ERROR(CheckIds("SlotAttention", "seq_ids", a.seq_ids, 0, a.k_slots.shape[0]));
  if (a.k_slots.shape[3] > 1024) return absl::InvalidArgumentError("cpu slot attention: head_dim above 1024");
  CpuSlotAttention(*pool_, a);
  return absl::OkStatus();
}

absl::Status CpuBackend::H2OPlace(const H2OPlaceArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OPlace(a));
  const int64_t heads = a.slot_pos.shape[1], slots = a.slot_pos.shape[2];
  FERRY_RETURN_IF_ERROR(CheckIds("H2OPlace", "seq_ids", a.seq_ids, 0, a.slot_pos.shape[0]));
  const int32_t* seq = a.seq_ids.as<const int32_t>();
  const int32_t* pos = a.positions.as<const int32_t>();
  for (int64_t i = 0; i < a.seq_ids.shape[0]; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (static_cast<int64_t>(seq[i]) * heads + h) * slots;
      uint8_t* occ = a.occupied.as<uint8_t>() + base;
      int64_t free = -1;
      for (int64_t j = 0; j < slots && free < 0; ++j) {
        if (!occ[j]) free = j;
      }
      a.slot_ids.as<int32_t>()[i * heads + h] = static_cast<int32_t>(free);
      if (free < 0) continue;
      a.slot_pos.as<int32_t>()[base + free] = pos[i];
      a.scores.as<float>()[base + free] = 0.0f;
      occ[free] = 1;
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::H2OUpdate(const H2OUpdateArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OUpdate(a));
  const int64_t n = a.seq_ids.shape[0], heads = a.slot_pos.shape[1], slots = a.slot_pos.shape[2];
  const int64_t group = a.probs.shape[1] / heads;  // query heads per KV head
  FERRY_RETURN_IF_ERROR(CheckIds("H2OUpdate", "seq_ids", a.seq_ids, 0, a.slot_pos.shape[0]));
  const int32_t* seq = a.seq_ids.as<const int32_t>();
  const int32_t* pos = a.positions.as<const int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (static_cast<int64_t>(seq[i]) * heads + h) * slots;
      uint8_t* occ = a.occupied.as<uint8_t>() + base;
      int32_t* at = a.slot_pos.as<int32_t>() + base;
      float* score = a.scores.as<float>() + base;
      int count = 0;
      for (int64_t j = 0; j < slots; ++j) {
        if (!occ[j]) continue;
        score[j] += GroupSum(a.probs.as<const float>() + (i * heads + h) * group * slots, group, slots, j);
        ++count;
      }
      if (count <= a.budget) continue;
      int64_t victim = -1;
      for (int64_t j = 0; j < slots; ++j) {
        if (!occ[j] || at[j] > pos[i] - a.recent || at[j] < a.protect) continue;  // empty, recent or protected
        if (victim < 0 || score[j] < score[victim] || (score[j] == score[victim] && at[j] < at[victim])) victim = j;
      }
      if (victim < 0) return absl::InternalError("H2OUpdate: over budget with nothing evictable (protect > heavy?)");
      occ[victim] = 0;
      at[victim] = -1;
      score[victim] = 0.0f;
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::H2OPrefill(const H2OPrefillArgs& a) {
  FERRY_RETURN_IF_ERROR(ValidateH2OPrefill(a));
  const int64_t used = a.col_sums.shape[0], heads = a.slot_pos.shape[1], max_len = a.col_sums.shape[2];
  const int64_t slots = a.slot_pos.shape[2], group = a.col_sums.shape[1] / heads;
  FERRY_RETURN_IF_ERROR(CheckIds("H2OPrefill", "rows", a.rows, 0, a.slot_pos.shape[0]));
  const int32_t* lengths = a.lengths.as<const int32_t>();
  for (int64_t u = 0; u < used; ++u) {
    if (lengths[u] < 0 || lengths[u] > max_len) return absl::InvalidArgumentError("H2OPrefill: a length is out of range");
  }
  pool_->ParallelFor(used * heads, 4, [&](int64_t begin, int64_t end) {
    std::vector<int> keep, rest;
    std::vector<float> summed(static_cast<size_t>(max_len));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / heads, h = item % heads;
      const int len = lengths[u];
      // The KV head's column sums: its query heads' in head order.
      for (int64_t p = 0; p < max_len; ++p) summed[p] = GroupSum(a.col_sums.as<const float>() + item * group * max_len, group, max_len, p);
      const float* col = summed.data();
      keep.clear();
      rest.clear();
      for (int p = 0; p < len; ++p) {
        if (p > len - 1 - a.recent || p < a.protect) {
          keep.push_back(p);
        } else {
          rest.push_back(p);
        }
      }
      const int heavy_left = a.heavy - std::min(a.protect, len);
      std::stable_sort(rest.begin(), rest.end(), [&](int x, int y) { return col[x] > col[y]; });
      for (int i = 0; i < static_cast<int>(rest.size()) && i < heavy_left; ++i) keep.push_back(rest[i]);
      std::sort(keep.begin(), keep.end());
      const int64_t base = (static_cast<int64_t>(a.rows.as<const int32_t>()[u]) * heads + h) * slots;
      int32_t* token_slot = a.token_slot.as<int32_t>();
      for (int64_t p = 0; p < max_len; ++p) token_slot[(u * max_len + p) * heads + h] = -1;
      for (int64_t j = 0; j < slots; ++j) {
        const bool kept = j < static_cast<int64_t>(keep.size());
        const int p = kept ? keep[j] : -1;
        a.slot_pos.as<int32_t>()[base + j] = p;
        a.scores.as<float>()[base + j] = kept ? col[p] : 0.0f;
        a.occupied.as<uint8_t>()[base + j] = kept ? 1 : 0;
        if (kept) token_slot[(u * max_len + p) * heads + h] = static_cast<int32_t>(j);
      }
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::GatherHostRows(const void* host_table, size_t row_bytes, const std::vector<int32_t>& rows, void* dst) {
  const char* src = static_cast<const char*>(host_table);
  char* out = static_cast<char*>(dst);
  const int64_t n = static_cast<int64_t>(rows.size());
  for (int64_t i = 0; i < n;) {  // one copy per run of consecutive rows
    if (rows[i] < 0) return absl::InvalidArgumentError("GatherHostRows: negative row");
    int64_t e = i + 1;
    while (e < n && rows[e] == rows[e - 1] + 1) ++e;
    std::memcpy(out + static_cast<size_t>(i) * row_bytes, src + static_cast<size_t>(rows[i]) * row_bytes,
                static_cast<size_t>(e - i) * row_bytes);
    i = e;
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyRows(const void* src, void* dst, size_t row_bytes, const std::vector<int32_t>& src_rows,
                                  const std::vector<int32_t>& dst_rows) {
  if (src_rows.size() != dst_rows.size()) return absl::InvalidArgumentError("CopyRows: src_rows and dst_rows differ in length");
  for (size_t i = 0; i < src_rows.size(); ++i) {
    if (src_rows[i] < 0 || dst_rows[i] < 0) return absl::InvalidArgumentError("CopyRows: negative row");
    std::memcpy(static_cast<char*>(dst) + static_cast<size_t>(dst_rows[i]) * row_bytes,
                static_cast<const char*>(src) + static_cast<size_t>(src_rows[i]) * row_bytes, row_bytes);
  }
  return absl::OkStatus();
}

}  // namespace ferry::kernels

