#include "engine/probe.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/file.h"
#include "base/quant.h"
#include "base/status.h"
#include "io/store.h"
#include "io/uring_reader.h"
#include "kernels/registry.h"
#include "offload/attention_cache.h"
#include "offload/ffn_bundles.h"

namespace ferry::engine {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// 9: prefill attention at head_dim 32 as well as 128.
// 8: linears of 64 and 256, the small op a LayerNorm of 16 x 256 (the backend's dispatch). 7: scattered disk pages. 6: Deja Vu's bundled FFN (gather from pinned memory + the FFN over the gathered neurons).
// 5: copies both ways at once. 4: linears over rotating copies (memory, not cache). 3: linears at several sizes.
// 2: within-device copies, quantized KV, prefill attention, host attention, op cost.
constexpr int kProbeVersion = 9;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// The median over `reps` repetitions of (work per call x calls) / time, each repetition calling
// `fn` until min_seconds have passed (after one untimed warm-up call).
absl::StatusOr<double> Rate(const ProbeOptions& o, double work_per_call, kernels::Backend& b, const std::function<absl::Status()>& fn) {
  FERRY_RETURN_IF_ERROR(fn());
  FERRY_RETURN_IF_ERROR(b.Synchronize());
  std::vector<double> rates;
  for (int r = 0; r < std::max(1, o.repetitions); ++r) {
    const auto t0 = Clock::now();
    int calls = 0;
    double s = 0;
    do {
      FERRY_RETURN_IF_ERROR(fn());
      ++calls;
      if (calls % 4 == 0 || o.min_seconds <= 0) FERRY_RETURN_IF_ERROR(b.Synchronize());
      s = Seconds(t0, Clock::now());
    } while (s < o.min_seconds);
    FERRY_RETURN_IF_ERROR(b.Synchronize());
    s = Seconds(t0, Clock::now());
    rates.push_back(work_per_call * calls / s);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

absl::StatusOr<kernels::DeviceBuffer> Upload(kernels::Backend& b, const void* data, size_t bytes) {
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer buf, b.Allocate(bytes));
  FERRY_RETURN_IF_ERROR(b.CopyToDevice(buf.data(), data, bytes));
  return buf;
}

absl::StatusOr<json> ProbeCopies(kernels::Backend& b, const ProbeOptions& o) {
  json out = {{"host_to_device", json::array()}, {"device_to_host", json::array()}, {"within_device", json::array()},
              {"host_memcpy", json::array()}};
  for (uint64_t chunk : o.copy_chunks) {
    if (o.progress) o.progress(absl::StrCat("copies of ", chunk >> 10, " KiB"));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer host, b.AllocateHost(chunk));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer dev, b.Allocate(chunk));
    std::memset(host.data(), 1, chunk);
    FERRY_ASSIGN_OR_RETURN(const double h2d, Rate(o, static_cast<double>(chunk), b, [&] {
      return b.TransferToDevice(dev.data(), host.data(), chunk);
    }));
    FERRY_ASSIGN_OR_RETURN(const double d2h, Rate(o, static_cast<double>(chunk), b, [&] {
      return b.CopyToHost(host.data(), dev.data(), chunk);
    }));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer dev2, b.Allocate(chunk));
    FERRY_ASSIGN_OR_RETURN(const double d2d, Rate(o, static_cast<double>(chunk), b, [&] {
      return b.TransferWithinDevice(dev2.data(), dev.data(), chunk);
    }));
    std::vector<char> a(chunk, 2), c(chunk);
    FERRY_ASSIGN_OR_RETURN(const double mc, Rate(o, static_cast<double>(chunk), b, [&] {
      std::memcpy(c.data(), a.data(), chunk);
      a[0] = c[chunk - 1];  // keep the copy observable
      return absl::OkStatus();
    }));
    out["host_to_device"].push_back({{"chunk_bytes", chunk}, {"GBps", h2d * 1e-9}});
    out["device_to_host"].push_back({{"chunk_bytes", chunk}, {"GBps", d2h * 1e-9}});
    out["within_device"].push_back({{"chunk_bytes", chunk}, {"GBps", d2d * 1e-9}});
    out["host_memcpy"].push_back({{"chunk_bytes", chunk}, {"GBps", mc * 1e-9}});
  }
  // Both directions at once, at the largest chunk: host->device on this thread (the streamer's copy
  // thread) while another copies device->host (KV traffic, logits), each rate over the same window.
  const uint64_t chunk = o.copy_chunks.empty() ? 0 : *std::max_element(o.copy_chunks.begin(), o.copy_chunks.end());
  if (chunk > 0) {
    if (o.progress) o.progress(absl::StrCat("copies both ways at once, ", chunk >> 10, " KiB"));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer up_host, b.AllocateHost(chunk));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer up_dev, b.Allocate(chunk));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer down_host, b.AllocateHost(chunk));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer down_dev, b.Allocate(chunk));
    std::memset(up_host.data(), 1, chunk);
    FERRY_RETURN_IF_ERROR(b.CopyToDevice(down_dev.data(), up_host.data(), chunk));
    const double window = std::max(0.05, 3 * o.min_seconds);
    std::atomic<bool> go{false};
    absl::Status down_status;
    uint64_t down_bytes = 0;
    double down_s = 0;
    std::thread down([&] {
      while (!go.load()) std::this_thread::yield();
      const auto t0 = Clock::now();
      do {
        down_status = b.CopyToHost(down_host.data(), down_dev.data(), chunk);
        down_bytes += chunk;
      } while (down_status.ok() && Seconds(t0, Clock::now()) < window);
      down_s = Seconds(t0, Clock::now());
    });
    go = true;
    const auto t0 = Clock::now();
    uint64_t up_bytes = 0;
    absl::Status up_status;
    do {
      up_status = b.TransferToDevice(up_dev.data(), up_host.data(), chunk);
      up_bytes += chunk;
    } while (up_status.ok() && Seconds(t0, Clock::now()) < window);
    if (up_status.ok()) up_status = b.Synchronize();
    const double up_s = Seconds(t0, Clock::now());
    down.join();
    FERRY_RETURN_IF_ERROR(up_status);
    FERRY_RETURN_IF_ERROR(down_status);
    out["both_directions"] = json::array({{{"chunk_bytes", chunk}, {"host_to_device_GBps", up_bytes / up_s * 1e-9},
                                           {"device_to_host_GBps", down_bytes / down_s * 1e-9}}});
  }
  return out;
}

absl::StatusOr<json> ProbeDisk(kernels::Backend& b, const ProbeOptions& o) {
  FERRY_RETURN_IF_ERROR(MakeDirs(o.disk_dir));
  const std::string path = o.disk_dir + "/ferry-probe.bin";
  const uint64_t size = std::max<uint64_t>(o.disk_file_bytes / io::kDirectAlignment * io::kDirectAlignment, 4 << 20);
  {
    // A scratch file of random bytes (written once per probe, removed after).
    ScopedFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", path, " for the disk probe"));
    std::vector<char> block(4 << 20);
    std::mt19937_64 rng(5);
    for (size_t i = 0; i + 8 <= block.size(); i += 8) {
      const uint64_t r = rng();
      std::memcpy(block.data() + i, &r, 8);
    }
    for (uint64_t at = 0; at < size; at += block.size()) {
      FERRY_RETURN_IF_ERROR(PwriteFull(fd.get(), block.data(), std::min<uint64_t>(block.size(), size - at), at, path));
    }
    if (::fsync(fd.get()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("fsync ", path));
  }
  // Every dirty page on the machine written back first (a store or dummy just written would share
  // the disk with the timed reads: on the dev VM the rates halved right after writing a store).
  ::sync();
  struct Remove {
    std::string p;
    ~Remove() { ::unlink(p.c_str()); }
  } remove{path};
  FERRY_ASSIGN_OR_RETURN(io::ReadFile file, io::ReadFile::Open(path, /*want_direct=*/true));
  const uint64_t span = std::min<uint64_t>(size, 64 << 20);  // bytes per timed call
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer dst, b.AllocateHost(span));
  // The median rate of reads of `span` bytes each, in requests of `block` with `depth` in flight,
  // walking the file so that O_DIRECT never rereads one range back to back.
  // A reader of `block` requests with `depth` in flight into dst (registered where the kernel allows).
  auto make_reader = [&](uint64_t block, unsigned depth) {
    io::UringOptions uo;
    uo.block_bytes = block;
    uo.queue_depth = depth;
    uo.registered = {{dst.data(), dst.bytes()}};
    auto reader = io::UringReader::Create(uo);
    if (!reader.ok()) {
      uo.registered.clear();
      reader = io::UringReader::Create(uo);
    }
    return reader;
  };
  auto read_rate = [&](uint64_t block, unsigned depth, uint64_t one) -> absl::StatusOr<double> {
    auto reader = make_reader(block, depth);
    if (!reader.ok()) return reader.status();
    uint64_t next = 0;
    return Rate(o, static_cast<double>(one), b, [&]() -> absl::Status {
      if (next + one > size) next = 0;
      FERRY_RETURN_IF_ERROR((*reader)->Read(file, next, dst.data(), one));
      next += one;
      return absl::OkStatus();
    });
  };
  json out = {{"path", o.disk_dir}, {"o_direct", file.direct}, {"file_bytes", size}, {"reads", json::array()}};
  for (uint64_t block : o.disk_blocks) {
    for (unsigned depth : o.disk_depths) {
      if (o.progress) o.progress(absl::StrCat("disk reads of ", block >> 10, " KiB, queue depth ", depth));
      FERRY_ASSIGN_OR_RETURN(const double rate, read_rate(block, depth, span));
      out["reads"].push_back({{"block_bytes", block}, {"queue_depth", depth}, {"GBps", rate * 1e-9}});
    }
  }
  // Scattered single pages (Deja Vu's bundles on disk: each gather reads the 4 KiB pages that hold
  // the chosen neurons), 2048 random pages per call in one ReadMany at the streamer's depth 16.
  {
    if (o.progress) o.progress("disk reads of scattered 4 KiB pages");
    auto reader = make_reader(1 << 20, 16);
    if (!reader.ok()) return reader.status();
    const uint64_t pages = size / 4096, want = std::min<uint64_t>(2048, std::min<uint64_t>(pages, span / 4096));
    std::mt19937_64 rng(6);
    std::vector<io::UringReader::ReadExtent> extents;
    auto draw = [&] {
      std::vector<uint64_t> at(want);
      for (uint64_t& p : at) p = rng() % pages;
      std::sort(at.begin(), at.end());
      at.erase(std::unique(at.begin(), at.end()), at.end());
      extents.clear();
      for (size_t i = 0; i < at.size(); ++i) extents.push_back({at[i] * 4096, static_cast<char*>(dst.data()) + i * 4096, 4096});
    };
    FERRY_ASSIGN_OR_RETURN(const double rate, Rate(o, 1.0, b, [&]() -> absl::Status {
      draw();
      return (*reader)->ReadMany(file, extents);
    }));
    out["pages"] = {{"page_bytes", 4096}, {"queue_depth", 16}, {"GBps", rate * static_cast<double>(want) * 4096 * 1e-9}};
  }
  // Reads of one span each (a layer's disk part is one read), at the streamer's default 1 MiB x 16.
  out["spans"] = json::array();
  for (uint64_t want : o.disk_spans) {
    const uint64_t one = std::min<uint64_t>(want / io::kDirectAlignment * io::kDirectAlignment, span);
    if (one == 0) continue;
    if (o.progress) o.progress(absl::StrCat("disk reads of one ", one >> 20, " MiB span each"));
    FERRY_ASSIGN_OR_RETURN(const double rate, read_rate(1 << 20, 16, one));
    out["spans"].push_back({{"span_bytes", one}, {"block_bytes", 1 << 20}, {"queue_depth", 16}, {"GBps", rate * 1e-9}});
  }
  return out;
}

// A Linear of rows x (n, n) with the weights in the backend, for each size n: FLOP/s and weight bytes/s.
absl::StatusOr<json> ProbeLinear(kernels::Backend& b, const ProbeOptions& o) {
  json out = json::array();
  for (const int64_t size : o.gemm_sizes) {
    const int64_t m = size, k = size;
    const std::vector<float> w = Random(static_cast<size_t>(m * k), 1);
    for (const std::string type : {"F32", "F16", "q8g64", "q4g64"}) {
      std::vector<char> host;
      TensorView view;
      if (type == "F32" || type == "F16") {
        const DType dt = type == "F32" ? DType::kF32 : DType::kF16;
        host.resize(static_cast<size_t>(m * k) * DTypeSize(dt));
        ConvertFromF32(dt, w.data(), host.data(), w.size());
        view = TensorView::Contiguous(nullptr, dt, {m, k}, b.device());
      } else {
        FERRY_ASSIGN_OR_RETURN(const QuantFormat f, ParseQuantFormatName(type));
        FERRY_ASSIGN_OR_RETURN(const QuantLayout layout, LayoutQuantized(f, m, k));
        host.resize(layout.bytes);
        QuantizeRows(f, layout, w.data(), m, k, reinterpret_cast<uint8_t*>(host.data()));
        view = TensorView::Contiguous(nullptr, DType::kU8, {m, k}, b.device());
        view.quant = f;
      }
      const size_t stride = (host.size() + 4095) / 4096 * 4096;
      const size_t copies = static_cast<size_t>(std::clamp<uint64_t>((o.linear_rotate_bytes + stride - 1) / stride, 1, 4096));
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer wbuf, b.Allocate(stride * copies));
      for (size_t c = 0; c < copies; ++c) FERRY_RETURN_IF_ERROR(b.CopyToDevice(static_cast<char*>(wbuf.data()) + c * stride, host.data(), host.size()));
      for (int64_t n : o.gemm_rows) {
        if (o.progress) o.progress(absl::StrCat("linear ", n, " x ", k, " -> ", m, ", ", type));
        const std::vector<float> x = Random(static_cast<size_t>(n * k), 2);
        FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer xbuf, Upload(b, x.data(), x.size() * sizeof(float)));
        FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer ybuf, b.Allocate(static_cast<size_t>(n * m) * sizeof(float)));
        kernels::LinearArgs a{TensorView::Contiguous(xbuf.data(), DType::kF32, {n, k}, b.device()), view, TensorView{},
                              TensorView::Contiguous(ybuf.data(), DType::kF32, {n, m}, b.device()), false};
        size_t next = 0;
        FERRY_ASSIGN_OR_RETURN(const double calls, Rate(o, 1.0, b, [&] {
          a.weight.data = static_cast<char*>(wbuf.data()) + (next++ % copies) * stride;
          return b.Linear(a);
        }));
        out.push_back({{"rows", n}, {"out", m}, {"in", k}, {"weights", type}, {"GFLOPs", 2.0 * n * m * k * calls * 1e-9},
                       {"weight_GBps", static_cast<double>(host.size()) * calls * 1e-9}});
      }
    }
  }
  return out;
}

// Decode attention: one query per row over `len` cached positions, for each KV type the backend
// takes (F32, F16, q8, q4: the CUDA backend refuses quantized caches, which is then not listed);
// and prefill attention: `len` causal queries of one sequence (F32 cache), in FLOP/s, at head_dim
// 128 and 32 (a small head's query-key pairs cost more than their FLOPs say: per-pair work that
// does not scale with head_dim; probe v9).
absl::StatusOr<json> ProbeAttention(kernels::Backend& b, const ProbeOptions& o, bool prefill) {
  const int heads = 32, len = prefill ? o.prefill_attention_len : o.attention_len;
  const int seqs = prefill ? 1 : o.attention_rows, rows = prefill ? len : o.attention_rows;
  json out = json::array();
  const Device dev = b.device();
  for (const int hd : prefill ? std::vector<int>{128, 32} : std::vector<int>{128}) {
    const int w = heads * hd;
    std::vector<KvType> types = {DType::kF32};
    if (!prefill) types = {DType::kF32, DType::kF16, *ParseKvType("q8", hd), *ParseKvType("q4", hd)};
    for (const KvType& type : types) {
      if (o.progress) o.progress(absl::StrCat(prefill ? "prefill" : "decode", " attention over ", len, " positions, ", KvTypeName(type), ", head_dim ", hd));
      const std::vector<float> kv = Random(static_cast<size_t>(seqs) * len * w, 3);
      std::vector<char> host(type.Bytes(static_cast<int64_t>(seqs) * len, w));
      if (type.quant) {
        FERRY_ASSIGN_OR_RETURN(const QuantLayout layout, LayoutQuantized(*type.quant, static_cast<int64_t>(seqs) * len, w));
        QuantizeRows(*type.quant, layout, kv.data(), static_cast<int64_t>(seqs) * len, w, reinterpret_cast<uint8_t*>(host.data()));
      } else {
        ConvertFromF32(type.dtype, kv.data(), host.data(), kv.size());
      }
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer kc, Upload(b, host.data(), host.size()));
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer vc, Upload(b, host.data(), host.size()));
      const std::vector<float> q = Random(static_cast<size_t>(rows) * w, 4);
      std::vector<int32_t> seq(static_cast<size_t>(rows)), pos(static_cast<size_t>(rows), len - 1);
      for (int r = 0; r < rows; ++r) {
        seq[r] = prefill ? 0 : r;
        if (prefill) pos[r] = r;
      }
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer qb, Upload(b, q.data(), q.size() * sizeof(float)));
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer sb, Upload(b, seq.data(), seq.size() * sizeof(int32_t)));
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer pb, Upload(b, pos.data(), pos.size() * sizeof(int32_t)));
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer ob, b.Allocate(q.size() * sizeof(float)));
      kernels::AttentionArgs a{TensorView::Contiguous(qb.data(), DType::kF32, {rows, w}, dev),
                               offload::KvView(kc.data(), type, {seqs, len, w}, dev),
                               offload::KvView(vc.data(), type, {seqs, len, w}, dev),
                               TensorView::Contiguous(sb.data(), DType::kI32, {rows}, dev),
                               TensorView::Contiguous(pb.data(), DType::kI32, {rows}, dev),
                               TensorView::Contiguous(ob.data(), DType::kF32, {rows, w}, dev),
                               heads, 1.0f / std::sqrt(static_cast<float>(hd)), TensorView{}};
      a.host_seq_ids = seq.data();
      a.host_positions = pos.data();
      if (type.quant) {
        const absl::Status tried = b.Attention(a);
        if (absl::IsUnimplemented(tried) || absl::IsInvalidArgument(tried)) continue;  // not on this backend
        FERRY_RETURN_IF_ERROR(tried);
      }
      if (prefill) {
        const double flops = 4.0 * heads * hd * (static_cast<double>(len) * (len + 1) / 2);
        FERRY_ASSIGN_OR_RETURN(const double rate, Rate(o, flops, b, [&] { return b.Attention(a); }));
        out.push_back({{"kv_dtype", KvTypeName(type)}, {"tokens", len}, {"heads", heads}, {"head_dim", hd}, {"GFLOPs", rate * 1e-9}});
      } else {
        FERRY_ASSIGN_OR_RETURN(const double rate, Rate(o, 2.0 * host.size(), b, [&] { return b.Attention(a); }));
        out.push_back({{"kv_dtype", KvTypeName(type)}, {"rows", rows}, {"positions", len}, {"heads", heads}, {"head_dim", hd},
                       {"kv_GBps", rate * 1e-9}});
      }
    }
  }
  return out;
}

// Deja Vu's FFN as a decode step runs it: the bundles of m random neurons gathered from a pinned
// table (8192 neurons of width d, larger than the caches) into backend memory, then the FFN over
// them, for F16 and q4 bundles at rows {1, 16} and m {256, 2048}: seconds per call.
absl::StatusOr<json> ProbeBundledFfn(kernels::Backend& b, const ProbeOptions& o) {
  json out = json::array();
  const int64_t d = o.quick ? 256 : 1024, table = o.quick ? 1024 : 8192;
  const std::vector<int64_t> ms = o.quick ? std::vector<int64_t>{64, 512} : std::vector<int64_t>{256, 2048};
  const std::vector<float> w = Random(static_cast<size_t>(2 * d + 1), 7);
  for (const char* type : {"F16", "q4g64"}) {
    const bool quant = std::string(type) != "F16";
    std::optional<QuantFormat> f;
    if (quant) f = *ParseQuantFormatName(type);
    const uint64_t bundle = offload::FfnBundles::BundleBytes(static_cast<int>(d), DType::kF16, f);
    std::vector<char> row(bundle, 0);
    if (quant) {
      FERRY_ASSIGN_OR_RETURN(const BundleQuantLayout l, LayoutQuantBundle(*f, d));
      QuantizeSpan(*f, l.row, w.data(), 2 * d, 0, 0, 2 * d, reinterpret_cast<uint8_t*>(row.data()));
    } else {
      ConvertFromF32(DType::kF16, w.data(), row.data(), w.size());
    }
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer pinned, b.AllocateHost(static_cast<size_t>(table) * bundle));
    for (int64_t j = 0; j < table; ++j) std::memcpy(static_cast<char*>(pinned.data()) + static_cast<size_t>(j) * bundle, row.data(), bundle);
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer gathered, b.Allocate(static_cast<size_t>(ms.back()) * bundle));
    for (int64_t n : {int64_t{1}, int64_t{16}}) {
      const std::vector<float> x = Random(static_cast<size_t>(n * d), 8), bias = Random(static_cast<size_t>(d), 9);
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer xb, Upload(b, x.data(), x.size() * sizeof(float)));
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer bb, Upload(b, bias.data(), bias.size() * sizeof(float)));
      FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer yb, b.Allocate(x.size() * sizeof(float)));
      for (int64_t m : ms) {
        if (o.progress) o.progress(absl::StrCat("bundled FFN ", n, " x ", d, " over ", m, " of ", table, " neurons, ", type));
        // Eight random neuron sets (sorted, distinct), used in turn.
        std::vector<std::vector<int32_t>> sets(8);
        std::mt19937 rng(10);
        std::vector<int32_t> all(static_cast<size_t>(table));
        for (int64_t j = 0; j < table; ++j) all[static_cast<size_t>(j)] = static_cast<int32_t>(j);
        for (auto& set : sets) {
          std::shuffle(all.begin(), all.end(), rng);
          set.assign(all.begin(), all.begin() + m);
          std::sort(set.begin(), set.end());
        }
        TensorView view = TensorView::Contiguous(gathered.data(), quant ? DType::kU8 : DType::kF16,
                                                 {m, static_cast<int64_t>(quant ? bundle : bundle / 2)}, b.device());
        view.quant = f;
        const kernels::BundledFfnArgs a{TensorView::Contiguous(xb.data(), DType::kF32, {n, d}, b.device()), view,
                                        TensorView::Contiguous(bb.data(), DType::kF32, {d}, b.device()),
                                        TensorView::Contiguous(yb.data(), DType::kF32, {n, d}, b.device())};
        size_t next = 0;
        FERRY_ASSIGN_OR_RETURN(const double calls, Rate(o, 1.0, b, [&] {
          FERRY_RETURN_IF_ERROR(b.GatherHostRows(pinned.data(), bundle, sets[next++ % sets.size()], gathered.data()));
          return b.BundledFfn(a);
        }));
        out.push_back({{"bundles", std::string(type).substr(0, quant ? 2 : 3)}, {"rows", n}, {"neurons", m}, {"d", d},
                       {"seconds", 1.0 / calls}});
      }
    }
  }
  return out;
}

// A layer's small ops (norms, adds, activations over a decode step's few rows) cost what the backend
// pays to issue one: a kernel launch, or on the CPU the op inline (one row) or the pool's dispatch
// to its threads (16 rows). Timed as a LayerNorm of rows x 256 (a few KiB: the issue, not the
// bytes): seconds per op at 1 and 16 rows.
absl::StatusOr<json> ProbeOpSeconds(kernels::Backend& b, const ProbeOptions& o) {
  if (o.progress) o.progress("one small op");
  constexpr int kDim = 256;
  json out = json::array();
  for (const int rows : {1, 16}) {
    const std::vector<float> x = Random(static_cast<size_t>(rows) * kDim, 6), gamma(kDim, 1.0f), beta(kDim, 0.0f);
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer xb, Upload(b, x.data(), x.size() * sizeof(float)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer gb, Upload(b, gamma.data(), gamma.size() * sizeof(float)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer bb, Upload(b, beta.data(), beta.size() * sizeof(float)));
    FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer yb, b.Allocate(x.size() * sizeof(float)));
    kernels::LayerNormArgs a;
    a.in = TensorView::Contiguous(xb.data(), DType::kF32, {rows, kDim}, b.device());
    a.gamma = TensorView::Contiguous(gb.data(), DType::kF32, {kDim}, b.device());
    a.beta = TensorView::Contiguous(bb.data(), DType::kF32, {kDim}, b.device());
    a.out = TensorView::Contiguous(yb.data(), DType::kF32, {rows, kDim}, b.device());
    FERRY_ASSIGN_OR_RETURN(const double per_s, Rate(o, 1.0, b, [&] { return b.LayerNorm(a); }));
    out.push_back({{"rows", rows}, {"seconds", 1.0 / per_s}});
  }
  return out;
}

std::string HostName() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "localhost";
  std::string s(buf);
  for (char& c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.') c = '_';
  }
  return s;
}

// A cached probe is used only when it is a probe of this version, host, backend, disk directory
// and kind (quick or not), and every field the table prints has its type (a cache edited or
// damaged is measured again, never trusted).
bool CacheMatches(const json& j, const kernels::Backend& backend, const ProbeOptions& options) {
  auto str = [](const json& o, const char* key) {
    return o.is_object() && o.contains(key) && o[key].is_string() ? o[key].get<std::string>() : std::string("\x01");
  };
  if (j.is_discarded() || !j.is_object() || str(j, "format") != "ferry-probe" || str(j, "host") != HostName() ||
      str(j, "backend") != backend.name() || !j.contains("version") || !j["version"].is_number_integer() ||
      j["version"].get<int64_t>() != kProbeVersion || !j.contains("options") || !j["options"].is_object()) {
    return false;
  }
  const json& o = j["options"];
  if (str(o, "disk_dir") != options.disk_dir || !o.contains("quick") || !o["quick"].is_boolean() || o["quick"].get<bool>() != options.quick) {
    return false;
  }
  if (!j.contains("copies") || !j["copies"].is_object() || !j.contains("linear") || !j["linear"].is_array() ||
      !j.contains("bundled_ffn") || !j["bundled_ffn"].is_array()) {
    return false;
  }
  try {
    (void)ProbeTable(j);  // reads every field it prints with its type
  } catch (const json::exception&) {
    return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<json> RunProbe(kernels::Backend& backend, const ProbeOptions& o) {
  json j = {{"format", "ferry-probe"}, {"version", kProbeVersion}, {"host", HostName()}, {"backend", backend.name()},
            {"probed_at", static_cast<int64_t>(std::time(nullptr))}};
  j["options"] = {{"quick", o.quick}, {"min_seconds", o.min_seconds}, {"repetitions", o.repetitions}, {"disk_dir", o.disk_dir},
                  {"disk_file_bytes", o.disk_file_bytes}, {"gemm_sizes", o.gemm_sizes}, {"linear_rotate_bytes", o.linear_rotate_bytes}};
  FERRY_ASSIGN_OR_RETURN(json copies, ProbeCopies(backend, o));
  j["copies"] = std::move(copies);
  if (!o.disk_dir.empty()) {
    FERRY_ASSIGN_OR_RETURN(json disk, ProbeDisk(backend, o));
    j["disk"] = std::move(disk);
  }
  FERRY_ASSIGN_OR_RETURN(json linear, ProbeLinear(backend, o));
  j["linear"] = std::move(linear);
  FERRY_ASSIGN_OR_RETURN(json attention, ProbeAttention(backend, o, /*prefill=*/false));
  j["attention"] = std::move(attention);
  FERRY_ASSIGN_OR_RETURN(json prefill, ProbeAttention(backend, o, /*prefill=*/true));
  j["prefill_attention"] = std::move(prefill);
  // A KV cache in host memory (--kv cpu) runs its attention on the CPU beside any device.
  if (backend.device() != Device::kCpu) {
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> cpu, kernels::CreateBackend({}));
    FERRY_ASSIGN_OR_RETURN(json host, ProbeAttention(*cpu, o, /*prefill=*/false));
    j["host_attention"] = std::move(host);
  } else {
    j["host_attention"] = j["attention"];
  }
  FERRY_ASSIGN_OR_RETURN(j["ops"], ProbeOpSeconds(backend, o));
  j["op_seconds"] = j["ops"].back()["seconds"];  // the dispatched op (16 rows)
  FERRY_ASSIGN_OR_RETURN(j["bundled_ffn"], ProbeBundledFfn(backend, o));
  {
    // The streamer checks every disk read's XXH3 in the disk thread: part of the disk stage.
    if (o.progress) o.progress("XXH3 of host memory");
    std::vector<char> buf(16 << 20, 3);
    uint64_t sink = 0;
    FERRY_ASSIGN_OR_RETURN(const double rate, Rate(o, static_cast<double>(buf.size()), backend, [&] {
      sink ^= io::StoreHash(buf.data(), buf.size());
      buf[sink % buf.size()] ^= 1;
      return absl::OkStatus();
    }));
    j["hash_GBps"] = rate * 1e-9;
  }
  return j;
}

std::string ProbeCachePath(const kernels::Backend& backend) {
  std::string dir;
  if (const char* d = std::getenv("FERRY_PROBE_DIR"); d != nullptr && *d != '\0') {
    dir = d;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x != '\0') {
    dir = std::string(x) + "/ferry/probe";
  } else {
    const char* home = std::getenv("HOME");
    dir = std::string(home != nullptr ? home : "/tmp") + "/.cache/ferry/probe";
  }
  std::string name = backend.name();
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.') c = '_';
  }
  return absl::StrCat(dir, "/", HostName(), "-", name, ".json");
}

ProbeMemory ProbeNeeds(const ProbeOptions& o) {
  uint64_t chunk = 0, span = 0;
  for (uint64_t c : o.copy_chunks) chunk = std::max(chunk, c);
  for (uint64_t c : o.disk_spans) span = std::max(span, c);
  if (!o.disk_dir.empty()) span = std::max<uint64_t>(span, std::min<uint64_t>(o.disk_file_bytes, 64 << 20));
  // Copies hold two chunks on each side; the linears their rotating weights and outputs; the
  // attention probes their caches (tens of MiB at most): 32 MiB over the largest.
  const uint64_t margin = 32 << 20;
  return {std::max(2 * chunk, o.linear_rotate_bytes) + margin, std::max(2 * chunk, span) + margin};
}

absl::StatusOr<json> LoadOrProbe(kernels::Backend& backend, const ProbeOptions& options, bool reprobe, bool* from_cache) {
  const std::string path = ProbeCachePath(backend);
  if (from_cache != nullptr) *from_cache = false;
  if (!reprobe && PathExists(path)) {
    auto text = ReadFileToString(path);
    if (text.ok()) {
      json j = json::parse(*text, nullptr, false);
      // A cache that is not a probe of this host and backend is measured again (and replaced).
      if (CacheMatches(j, backend, options)) {
        if (from_cache != nullptr) *from_cache = true;
        return j;
      }
    }
  }
  const ProbeMemory need = ProbeNeeds(options);
  if ((options.device_budget > 0 && need.device > options.device_budget) || (options.host_budget > 0 && need.host > options.host_budget)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "measuring this machine needs about ", need.device >> 20, " MiB of device and ", need.host >> 20,
        " MiB of pinned memory, more than the budgets given (--gpu-mem, --cpu-mem); run `ferry probe",
        options.disk_dir.empty() ? std::string() : absl::StrCat(" --dir ", options.disk_dir),
        "` once without them (the probe is cached per host and disk directory) and plan again"));
  }
  FERRY_ASSIGN_OR_RETURN(json j, RunProbe(backend, options));
  FERRY_RETURN_IF_ERROR(MakeDirs(path.substr(0, path.rfind('/'))));
  FERRY_RETURN_IF_ERROR(WriteFileAtomically(path, j.dump(1) + "\n"));
  return j;
}

// Reads with .at(): a missing or mistyped field throws json::exception (the cache check catches
// it) rather than reading out of bounds.
std::string ProbeTable(const json& j) {
  std::string s = absl::StrFormat("probe of %s, backend %s\n", j.value("host", "?"), j.value("backend", "?"));
  const json& c = j.at("copies");
  for (const auto& [name, title] : {std::pair{"host_to_device", "host->device GB/s"}, std::pair{"device_to_host", "device->host GB/s"},
                                    std::pair{"within_device", "within device GB/s"}, std::pair{"host_memcpy", "host memcpy GB/s"}}) {
    absl::StrAppend(&s, absl::StrFormat("%-22s", title));
    for (const auto& e : c.at(name)) {
      absl::StrAppend(&s, absl::StrFormat("  %.0fK: %.2f", e.at("chunk_bytes").get<double>() / 1024,
                                          e.at("GBps").get<double>()));
    }
    s += "\n";
  }
  for (const auto& e : c.value("both_directions", json::array())) {
    absl::StrAppend(&s, absl::StrFormat("both ways at once       %.0fK: host->device %.2f, device->host %.2f GB/s\n",
                                        e.at("chunk_bytes").get<double>() / 1024,
                                        e.at("host_to_device_GBps").get<double>(), e.at("device_to_host_GBps").get<double>()));
  }
  if (j.contains("disk")) {
    absl::StrAppend(&s, absl::StrFormat("disk (%s, O_DIRECT %s) GB/s by block and queue depth:\n",
                                        j.at("disk").at("path").get<std::string>(), j.at("disk").at("o_direct").get<bool>() ? "yes" : "no"));
    for (const auto& e : j.at("disk").at("reads")) {
      absl::StrAppend(&s, absl::StrFormat("  %6.0fK x %3.0f: %.2f\n", e.at("block_bytes").get<double>() / 1024,
                                          e.at("queue_depth").get<double>(), e.at("GBps").get<double>()));
    }
    if (j.at("disk").contains("pages")) {
      absl::StrAppend(&s, absl::StrFormat("  scattered 4K pages x 16: %.2f\n", j.at("disk").at("pages").at("GBps").get<double>()));
    }
  }
  s += "linear (rows x in -> out, weights): GFLOP/s, weight GB/s\n";
  for (const auto& e : j.at("linear")) {
    absl::StrAppend(&s, absl::StrFormat("  %4.0f x %.0f -> %.0f %-6s %9.2f %8.2f\n", e.at("rows").get<double>(),
                                        e.at("in").get<double>(), e.at("out").get<double>(),
                                        e.at("weights").get<std::string>(), e.at("GFLOPs").get<double>(), e.at("weight_GBps").get<double>()));
  }
  for (const auto& [key, title] : {std::pair{"attention", "decode attention"}, std::pair{"host_attention", "decode attention on the host (--kv cpu)"}}) {
    absl::StrAppend(&s, title, ": KV GB/s\n");
    for (const auto& e : j.value(key, json::array())) {
      absl::StrAppend(&s, absl::StrFormat("  %-6s %.0f rows x %.0f positions: %.2f\n", e.at("kv_dtype").get<std::string>(), e.at("rows").get<double>(),
                                          e.at("positions").get<double>(), e.at("kv_GBps").get<double>()));
    }
  }
  for (const auto& e : j.value("prefill_attention", json::array())) {
    absl::StrAppend(&s, absl::StrFormat("prefill attention, %.0f causal tokens, head_dim %.0f: %.2f GFLOP/s\n", e.at("tokens").get<double>(),
                                        e.value("head_dim", 128.0), e.at("GFLOPs").get<double>()));
  }
  if (j.contains("hash_GBps")) absl::StrAppend(&s, absl::StrFormat("XXH3 (disk reads are checked): %.2f GB/s\n", j.at("hash_GBps").get<double>()));
  if (j.contains("ops")) {
    absl::StrAppend(&s, "one small op (LayerNorm of rows x 256) us:");
    for (const auto& e : j.at("ops")) {
      absl::StrAppend(&s, absl::StrFormat("  %d rows: %.2f", e.at("rows").get<int>(), e.at("seconds").get<double>() * 1e6));
    }
    absl::StrAppend(&s, "\n");
  } else if (j.contains("op_seconds")) {
    absl::StrAppend(&s, absl::StrFormat("one small op: %.2f us\n", j.at("op_seconds").get<double>() * 1e6));
  }
  if (j.contains("bundled_ffn")) {
    s += "Deja Vu FFN (gather + FFN) ms:";
    for (const auto& e : j.at("bundled_ffn")) {
      absl::StrAppend(&s, absl::StrFormat("  %s %dx%d m%d: %.3f", e.at("bundles").get<std::string>(), e.at("rows").get<int64_t>(),
                                          e.at("d").get<int64_t>(), e.at("neurons").get<int64_t>(), e.at("seconds").get<double>() * 1e3));
    }
    s += "\n";
  }
  return s;
}

}  // namespace ferry::engine
