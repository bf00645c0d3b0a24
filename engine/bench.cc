#include "engine/bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/status.h"
#include "engine/cost_model.h"
#include "engine/model.h"
#include "engine/sparsity.h"
#include "io/store.h"
#include "offload/host_kv_cache.h"

namespace ferry::engine {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Host -> device bandwidth through the transfer queue (pinned source), bytes/s.
absl::StatusOr<double> ProbeH2D(kernels::Backend& b, size_t bytes) {
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer host, b.AllocateHost(bytes));
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer dev, b.Allocate(bytes));
  std::memset(host.data(), 1, bytes);
  FERRY_RETURN_IF_ERROR(b.TransferToDevice(dev.data(), host.data(), bytes));  // warm-up
  const int reps = 4;
  const auto t0 = Clock::now();
  for (int i = 0; i < reps; ++i) FERRY_RETURN_IF_ERROR(b.TransferToDevice(dev.data(), host.data(), bytes));
  return reps * static_cast<double>(bytes) / Seconds(t0, Clock::now());
}

// O_DIRECT read bandwidth of the store's data file with the streamer's queue depth and block size:
// the layers' region (what a decode step streams from the disk when all of it is there) read once
// in file order, at least min_bytes (a small store is read several times; O_DIRECT never reads from
// the cache) and at most max_bytes, after one untimed chunk, in kSegments timed segments, each one
// pipeline of chunk-sized extents landing in the same pinned buffer so that queue_depth requests
// stay in flight across chunks as in the streamer's layer-sized reads. The floor uses the median
// segment. Why the whole region: on the H100 machine a 2 GiB probe (scattered, in file order from
// the middle, or one pipeline from the start) said 1.1-1.2 GB/s while the streamer read the whole
// file at 2.0 GB/s right after it; reading what the streamer reads measures the same bytes. The
// bench probes again after the decode steps (the model freed), where the disk is as the decode
// steps left it, and the floor takes the faster of the two: a floor is the least time the link
// allows, so the best rate measured on it.
struct DiskProbe {
  double median = 0;             // bytes/s
  std::vector<double> segments;  // bytes/s, in order
};

std::vector<double> GBps(const std::vector<double>& bytes_per_s) {
  std::vector<double> v;
  for (double x : bytes_per_s) v.push_back(x * 1e-9);
  return v;
}

absl::StatusOr<DiskProbe> ProbeDisk(kernels::Backend& b, const io::Store& store, const io::UringOptions& uo_in, uint64_t min_bytes,
                                    uint64_t max_bytes, uint64_t max_chunk) {
  constexpr uint64_t kSegments = 8;
  DiskProbe probe;
  uint64_t begin = 0, end = store.data_bytes() / 4096 * 4096;
  if (!store.layers().empty()) {
    begin = store.layers().front().offset;
    end = std::min(end, store.layers().back().offset + store.layers().back().bytes);
  }
  const uint64_t data = end > begin ? end - begin : 0;
  const size_t chunk = static_cast<size_t>(std::min<uint64_t>(std::min<uint64_t>(64 << 20, max_chunk), data));
  if (chunk == 0) return probe;
  FERRY_ASSIGN_OR_RETURN(kernels::DeviceBuffer host, b.AllocateHost(chunk));
  io::UringOptions uo = uo_in;
  uo.registered = {{host.data(), chunk}};
  FERRY_ASSIGN_OR_RETURN(io::ReadFile file, io::ReadFile::Open(store.data_path(), true));
  auto reader = io::UringReader::Create(uo);
  if (!reader.ok()) {
    uo.registered.clear();
    reader = io::UringReader::Create(uo);
  }
  if (!reader.ok()) return reader.status();
  const uint64_t chunks_in_file = data / chunk;
  const uint64_t total = std::clamp<uint64_t>(chunks_in_file * chunk, min_bytes, std::max(min_bytes, max_bytes));
  const uint64_t per_segment = std::max<uint64_t>(total / chunk / kSegments, 1);
  FERRY_RETURN_IF_ERROR((*reader)->Read(file, begin + (chunks_in_file - 1) * chunk, host.data(), chunk));  // warm-up
  uint64_t next = 0;
  for (uint64_t seg = 0; seg < kSegments; ++seg) {
    std::vector<io::UringReader::ReadExtent> extents;
    for (uint64_t i = 0; i < per_segment; ++i, ++next) extents.push_back({begin + (next % chunks_in_file) * chunk, host.data(), chunk});
    const auto t0 = Clock::now();
    FERRY_RETURN_IF_ERROR((*reader)->ReadMany(file, extents));
    probe.segments.push_back(static_cast<double>(per_segment) * chunk / Seconds(t0, Clock::now()));
  }
  std::vector<double> sorted = probe.segments;
  std::sort(sorted.begin(), sorted.end());
  probe.median = (sorted[kSegments / 2 - 1] + sorted[kSegments / 2]) / 2;
  return probe;
}

}  // namespace

absl::StatusOr<BenchResult> RunBench(const BenchOptions& o) {
  if (o.prompt_len < 1 || o.gen_len < 1 || o.policy.gpu_batch_size < 1 || o.policy.num_gpu_batches < 1) {
    return absl::InvalidArgumentError("prompt-len, gen-len, gpu-batch-size and num-gpu-batches must be positive");
  }
  auto say = [&](const std::string& s) {
    if (o.progress) o.progress(s);
  };
  FERRY_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::FromModelDir(o.store_dir));
  if (o.prompt_len + o.gen_len > config.max_positions) {
    return absl::InvalidArgumentError(absl::StrCat("prompt-len + gen-len = ", o.prompt_len + o.gen_len,
                                                   " exceeds the model's context of ", config.max_positions));
  }
  FERRY_ASSIGN_OR_RETURN(io::Store store, io::Store::Open(o.store_dir));
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(o.backend));
  // Device bytes beyond the weights for a batch: the KV cache (dense or H2O) and the workspace of
  // the prefill, which runs the whole batch in one pass so that weights cross the link once.
  // The policy of a batch of gbs x num_gpu_batches: the KV cache and the reserves (the cache and
  // the prefill's workspace) come from the same code the planner uses (PolicyOffload).
  const Workload workload{o.prompt_len, o.gen_len, 0};
  const bool sparse = o.sparsity_sim > 0.0 || !o.sparsity_dir.empty();
  if (o.sparsity_sim < 0.0 || o.sparsity_sim > 1.0) return absl::InvalidArgumentError("--sparsity-sim must be in (0, 1]");
  if (o.sparsity_sim > 0.0 && !o.sparsity_dir.empty()) return absl::InvalidArgumentError("--sparsity-sim and --sparsity exclude each other");
  if (!o.sparsity_dir.empty() && !(o.sparsity_k > 0.0 && o.sparsity_k <= 1.0)) return absl::InvalidArgumentError("--sparsity-k must be in (0, 1]");
  if (o.sparsity_cache < 0.0 || o.sparsity_cache > 1.0) return absl::InvalidArgumentError("--sparsity-cache must be in [0, 1]");
  if (o.sparsity_cache > 0.0 && !sparse) return absl::InvalidArgumentError("--sparsity-cache needs --sparsity or --sparsity-sim");
  // The policy as the planner sees it: Deja Vu's fraction (the simulated density, or the
  // predictors' k) and device cache are part of it, so budgets and --fit-batch count the bundles.
  Policy base = o.policy;
  base.sparsity = o.sparsity_sim > 0.0 ? o.sparsity_sim : sparse ? o.sparsity_k : 0.0;
  base.sparsity_cache = o.sparsity_cache;
  auto policy_of = [&](int64_t gbs) {
    Policy p = base;
    p.gpu_batch_size = static_cast<int>(gbs);
    return p;
  };
  auto offload_of = [&](int64_t gbs) {
    OffloadOptions t = PolicyOffload(config, policy_of(gbs), workload, o.backend.memory_budget_bytes, o.backend.host_budget_bytes);
    t.streamer.uring = o.uring;
    return t;
  };
  OffloadOptions off = offload_of(o.policy.gpu_batch_size);
  int gpu_batch_size = o.policy.gpu_batch_size;
  if (o.fit_batch) {
    if (off.device_budget == 0) return absl::InvalidArgumentError("--fit-batch needs --gpu-mem");
    auto fits = [&](int64_t gbs) { return Model::PlanOffload(store, offload_of(gbs), *backend).ok(); };
    if (!fits(1)) return Model::PlanOffload(store, offload_of(1), *backend).status();  // says what does not fit
    int64_t lo = 1, hi = 2;
    while (hi <= (1 << 20) && fits(hi)) lo = hi, hi *= 2;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (fits(mid) ? lo : hi) = mid;
    }
    gpu_batch_size = static_cast<int>(lo);
    say(absl::StrCat("largest batch that fits: ", gpu_batch_size, " x ", o.policy.num_gpu_batches));
  }
  const int batch = gpu_batch_size * o.policy.num_gpu_batches;
  auto kv_spec = [&](int64_t) { return PolicyKvSpec(config, policy_of(gpu_batch_size), workload); };

  // Probes first, in memory the model does not hold yet (sized to fit the budgets).
  uint64_t probe_bytes = 64 << 20;
  if (o.backend.memory_budget_bytes > 0) probe_bytes = std::min<uint64_t>(probe_bytes, o.backend.memory_budget_bytes / 4);
  if (o.backend.host_budget_bytes > 0) probe_bytes = std::min<uint64_t>(probe_bytes, o.backend.host_budget_bytes / 4);
  probe_bytes = std::max<uint64_t>(probe_bytes / 4096 * 4096, 4096);
  say("probing host->device bandwidth");
  FERRY_ASSIGN_OR_RETURN(const double h2d_bw, ProbeH2D(*backend, probe_bytes));
  // Before the run and again after it (see ProbeDisk), over the layer region: 2 to 16 GiB.
  auto probe_disk = [&] { return ProbeDisk(*backend, store, o.uring, uint64_t{2} << 30, uint64_t{16} << 30, probe_bytes); };
  DiskProbe disk_probe;
  if (o.policy.split.disk > 0) {
    say("probing disk bandwidth (O_DIRECT)");
    FERRY_ASSIGN_OR_RETURN(disk_probe, probe_disk());
  }

  off = offload_of(gpu_batch_size);
  say("loading the model");
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::LoadOffloaded(o.store_dir, backend.get(), off));
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<offload::AttentionCache> cache, offload::CreateKvCache(*backend, kv_spec(batch)));

  FfnSelector select;
  std::optional<SparseFfn> predictors;
  if (o.sparsity_sim > 0.0) {
    select = RandomFfnSelector(config.ffn_dim, o.sparsity_sim, o.seed);
  } else if (!o.sparsity_dir.empty()) {
    FERRY_ASSIGN_OR_RETURN(predictors, SparseFfn::Load(o.sparsity_dir, config));
    predictors->set_k_fraction(o.sparsity_k);
    select = predictors->Selector(*backend);
  }
  // Layers whose measured union is too large to gain run dense (every bundle, no predictor).
  std::shared_ptr<AdaptiveFfnSelector> adaptive;
  if (select) {
    adaptive = std::make_shared<AdaptiveFfnSelector>(std::move(select), config.num_layers, config.ffn_dim, o.sparsity_dense_above);
    select = [adaptive](int layer, const TensorView& x) { return (*adaptive)(layer, x); };
  }

  std::mt19937 rng(static_cast<uint32_t>(o.seed));
  ForwardBatch pre;
  for (int s = 0; s < batch; ++s) {
    for (int i = 0; i < o.prompt_len; ++i) {
      pre.tokens.push_back(i == 0 ? config.bos_token_id : static_cast<int>(rng() % (config.vocab_size - 4)) + 4);
      pre.seq_ids.push_back(s);
      pre.positions.push_back(i);
    }
    pre.logit_rows.push_back(static_cast<int32_t>(pre.tokens.size()) - 1);
    if ((s + 1) % gpu_batch_size == 0) pre.micro_batch_ends.push_back(static_cast<int32_t>(pre.tokens.size()));
  }
  std::vector<float> logits;
  say(absl::StrCat("prefill: ", batch, " x ", o.prompt_len, " tokens"));
  const auto stats0 = model->streamer()->stats();
  const auto t0 = Clock::now();
  FERRY_RETURN_IF_ERROR(model->Forward(pre, *cache, &logits));
  const auto t1 = Clock::now();
  const auto stats1 = model->streamer()->stats();
  const offload::FfnBundles* bundles = model->bundles();
  const uint64_t bundles1 = bundles ? bundles->bytes_moved() : 0, bundle_disk1 = bundles ? bundles->disk_bytes_read() : 0;
  const uint64_t hits1 = bundles ? bundles->cache_hits() : 0, misses1 = bundles ? bundles->cache_misses() : 0;
  std::vector<int> next(batch);
  for (int s = 0; s < batch; ++s) {
    const float* row = logits.data() + static_cast<size_t>(s) * config.vocab_size;
    next[s] = static_cast<int>(std::max_element(row, row + config.vocab_size) - row);
  }
  for (int step = 1; step < o.gen_len; ++step) {
    ForwardBatch dec;
    for (int s = 0; s < batch; ++s) {
      dec.tokens.push_back(next[s]);
      dec.seq_ids.push_back(s);
      dec.positions.push_back(o.prompt_len + step - 1);
      dec.logit_rows.push_back(s);
      if ((s + 1) % gpu_batch_size == 0) dec.micro_batch_ends.push_back(s + 1);
    }
    if (select) dec.ffn_select = &select;
    FERRY_RETURN_IF_ERROR(model->Forward(dec, *cache, &logits));
    for (int s = 0; s < batch; ++s) {
      const float* row = logits.data() + static_cast<size_t>(s) * config.vocab_size;
      next[s] = static_cast<int>(std::max_element(row, row + config.vocab_size) - row);
    }
    say(absl::StrFormat("decode step %d/%d, %.3f s so far", step, o.gen_len - 1, Seconds(t1, Clock::now())));
  }
  const auto t2 = Clock::now();
  const auto stats2 = model->streamer()->stats();
  const uint64_t bundles2 = bundles ? bundles->bytes_moved() : 0, bundle_disk2 = bundles ? bundles->disk_bytes_read() : 0;
  const uint64_t hits = (bundles ? bundles->cache_hits() : 0) - hits1;
  const uint64_t lookups = hits + (bundles ? bundles->cache_misses() : 0) - misses1;

  const double prefill_s = Seconds(t0, t1), decode_s = Seconds(t1, t2), total_s = prefill_s + decode_s;
  const int steps = o.gen_len - 1;
  uint64_t disk_step = 0, h2d_step = 0;
  for (const auto& l : model->plan().layers) {
    if (!l.streamed()) continue;
    disk_step += l.disk_bytes();
    h2d_step += l.cpu_bytes() + l.disk_bytes();
  }
  const uint64_t bundle_bytes = bundles ? bundles->bundle_bytes() : 0;
  const uint64_t plan_device = model->plan().device_bytes, plan_host = model->plan().host_bytes;
  const std::vector<int> dense_layers = adaptive ? adaptive->dense_layers() : std::vector<int>();
  // The cost model's prediction of this policy on this plan.
  std::optional<Prediction> predicted;
  if (o.probe) {
    FERRY_ASSIGN_OR_RETURN(const CostModel cm, CostModel::FromProbe(*o.probe));
    FERRY_ASSIGN_OR_RETURN(const WeightLayout layout, LayoutOf(store));
    FERRY_ASSIGN_OR_RETURN(predicted, cm.Predict(config, layout, policy_of(gpu_batch_size), workload, model->plan(), o.uring));
  }
  DiskProbe disk_probe_after;
  if (o.policy.split.disk > 0) {
    select = nullptr;
    adaptive.reset();
    predictors.reset();
    cache.reset();
    model.reset();  // the probe's buffer in memory the model held
    say("probing disk bandwidth again after the decode steps");
    FERRY_ASSIGN_OR_RETURN(disk_probe_after, probe_disk());
  }
  const double disk_bw = std::max(disk_probe.median, disk_probe_after.median);
  // Sparse FFN: the fetched bundles cross the same link (measured), next to the attention part.
  const uint64_t bundle_step = steps > 0 ? (bundles2 - bundles1) / static_cast<uint64_t>(steps) : 0;
  const uint64_t dense_ffn_step = sparse ? bundle_bytes * config.ffn_dim * config.num_layers : 0;  // once per step
  h2d_step += bundle_step;
  disk_step += steps > 0 ? (bundle_disk2 - bundle_disk1) / static_cast<uint64_t>(steps) : 0;  // bundle pages from the SSD
  const double step_s = steps > 0 ? decode_s / steps : 0.0;
  const double floor_h2d = h2d_bw > 0 ? h2d_step / h2d_bw : 0.0, floor_disk = disk_bw > 0 ? disk_step / disk_bw : 0.0;
  const double floor_s = std::max(floor_h2d, floor_disk);
  const double compute_s = decode_s - (stats2.acquire_wait_seconds - stats1.acquire_wait_seconds);
  // Faster than the floor means a probe under-read its link: say so rather than claim the impossible.
  const bool floor_doubtful = floor_s > 0 && step_s < 0.97 * floor_s;
  std::string weights_format = "float";
  for (const io::StoreTensor* t : store.LayerTensors(0)) {
    if (t->info.shape.size() == 2) weights_format = t->info.quant ? QuantFormatName(*t->info.quant) : DTypeName(t->info.dtype);
  }
  nlohmann::json j = {
      {"model", config.num_layers > 0 ? o.store_dir : ""},
      {"device", o.backend.name},
      {"batch", batch}, {"gpu_batch_size", gpu_batch_size}, {"num_gpu_batches", o.policy.num_gpu_batches},
      {"batch_fitted_to_budget", o.fit_batch},
      {"kv_cache", o.policy.h2o.has_value() ? absl::StrCat("h2o ", o.policy.h2o->heavy, "+", o.policy.h2o->recent, o.policy.kv_on_cpu ? ", on the CPU" : "")
                   : o.policy.kv_on_cpu   ? std::string("full, on the CPU")
                                   : std::string("full")},
      {"kv_dtype", KvTypeName(o.policy.kv_dtype)},
      {"prompt_len", o.prompt_len}, {"gen_len", o.gen_len},
      {"weights_percent", {o.policy.split.gpu, o.policy.split.cpu, o.policy.split.disk}},
      {"weights_format", weights_format},
      {"prefill_s", prefill_s}, {"decode_s", decode_s}, {"total_s", total_s},
      {"throughput_tok_s", batch * o.gen_len / total_s},
      {"decode_throughput_tok_s", steps > 0 ? batch * steps / decode_s : 0.0},
      {"decode_step_s", step_s},
      {"bytes_per_step", {{"disk_to_pinned", disk_step}, {"pinned_to_device", h2d_step}}},
      // Since the pipeline started (it prefetches the first layers while the model loads).
      {"bytes_moved", {{"disk_to_pinned", stats2.disk_bytes}, {"pinned_to_device", stats2.h2d_bytes},
                       {"within_device", stats2.d2d_bytes}}},
      {"prefill_link_GBps", {{"disk", (stats1.disk_bytes - stats0.disk_bytes) / prefill_s * 1e-9},
                             {"pinned_to_device", (stats1.h2d_bytes - stats0.h2d_bytes) / prefill_s * 1e-9}}},
      {"decode_link_GBps", {{"disk", steps > 0 ? (stats2.disk_bytes - stats1.disk_bytes) / decode_s * 1e-9 : 0.0},
                            {"pinned_to_device", steps > 0 ? (stats2.h2d_bytes - stats1.h2d_bytes) / decode_s * 1e-9 : 0.0}}},
      {"probe_GBps", {{"pinned_to_device", h2d_bw * 1e-9}, {"disk", disk_bw * 1e-9}}},
      {"disk_probe_segments_GBps", GBps(disk_probe.segments)},
      {"disk_probe_after_segments_GBps", GBps(disk_probe_after.segments)},
      {"floor_step_s", floor_s},
      {"step_over_floor", floor_s > 0 ? step_s / floor_s : 0.0},
      {"floor_doubtful", floor_doubtful},
      {"decode_busy_s", {{"disk", stats2.disk_seconds - stats1.disk_seconds},
                         {"copy", stats2.copy_seconds - stats1.copy_seconds},
                         {"compute", compute_s}}},
      {"sparse_ffn", sparse ? nlohmann::json{{"mode", o.sparsity_sim > 0.0 ? "sim" : "predictors"},
                                              {"density_or_k", o.sparsity_sim > 0.0 ? o.sparsity_sim : o.sparsity_k},
                                              {"bundle_bytes_per_step", bundle_step},
                                              {"dense_ffn_bytes_per_step", dense_ffn_step},
                                              {"fetched_fraction", dense_ffn_step > 0 ? static_cast<double>(bundle_step) / dense_ffn_step : 0.0},
                                              {"dense_above", o.sparsity_dense_above},
                                              {"device_cache_fraction", o.sparsity_cache},
                                              {"device_cache_hit_rate", lookups > 0 ? static_cast<double>(hits) / lookups : 0.0},
                                              {"layers_run_dense", dense_layers}}
                            : nlohmann::json()},
      {"memory", {{"plan_device", plan_device}, {"plan_pinned", plan_host},
                  {"gpu_budget", o.backend.memory_budget_bytes}, {"cpu_budget", o.backend.host_budget_bytes}}}};
  j["policy"] = o.policy_source;
  if (predicted) {
    j["predicted"] = predicted->ToJson();
    j["measured_over_predicted"] = {{"prefill", prefill_s / predicted->prefill_s},
                                    {"decode_step", steps > 0 ? step_s / predicted->step_s : 0.0},
                                    {"throughput", (batch * o.gen_len / total_s) / predicted->throughput_tok_s}};
  }
  BenchResult r;
  r.json = j;
  return r;
}

std::string BenchResult::Table() const {
  const auto& j = json;
  std::string s;
  auto line = [&](const std::string& k, const std::string& v) { s += absl::StrFormat("%-28s %s\n", k, v); };
  line("device", j["device"].get<std::string>());
  line("KV cache", absl::StrCat(j["kv_cache"].get<std::string>(), ", ", j["kv_dtype"].get<std::string>()));
  line("batch (gbs x ngb)", absl::StrFormat("%d (%d x %d)%s", j["batch"].get<int>(), j["gpu_batch_size"].get<int>(),
                                            j["num_gpu_batches"].get<int>(),
                                            j["batch_fitted_to_budget"].get<bool>() ? ", the largest that fits" : ""));
  line("prompt / gen", absl::StrFormat("%d / %d", j["prompt_len"].get<int>(), j["gen_len"].get<int>()));
  if (j.contains("weights_format")) line("layer matrices", j["weights_format"].get<std::string>());
  line("weights GPU,CPU,DISK %", absl::StrFormat("%g,%g,%g", j["weights_percent"][0].get<double>(),
                                                 j["weights_percent"][1].get<double>(), j["weights_percent"][2].get<double>()));
  line("prefill", absl::StrFormat("%.3f s", j["prefill_s"].get<double>()));
  line("decode", absl::StrFormat("%.3f s (%.4f s/step)", j["decode_s"].get<double>(), j["decode_step_s"].get<double>()));
  line("throughput", absl::StrFormat("%.2f tok/s total, %.2f tok/s decode", j["throughput_tok_s"].get<double>(),
                                     j["decode_throughput_tok_s"].get<double>()));
  line("bytes/step disk->pinned", absl::StrFormat("%.1f MiB", j["bytes_per_step"]["disk_to_pinned"].get<double>() / 1048576));
  line("bytes/step pinned->device", absl::StrFormat("%.1f MiB", j["bytes_per_step"]["pinned_to_device"].get<double>() / 1048576));
  line("prefill link rate", absl::StrFormat("disk %.2f GB/s, pinned->device %.2f GB/s", j["prefill_link_GBps"]["disk"].get<double>(),
                                            j["prefill_link_GBps"]["pinned_to_device"].get<double>()));
  line("decode link rate", absl::StrFormat("disk %.2f GB/s, pinned->device %.2f GB/s", j["decode_link_GBps"]["disk"].get<double>(),
                                           j["decode_link_GBps"]["pinned_to_device"].get<double>()));
  line("probe bandwidth", absl::StrFormat("disk %.2f GB/s, pinned->device %.2f GB/s", j["probe_GBps"]["disk"].get<double>(),
                                          j["probe_GBps"]["pinned_to_device"].get<double>()));
  auto segments = [&](const char* key) {
    return absl::StrJoin(j[key].get<std::vector<double>>(), " ",
                         [](std::string* out, double v) { absl::StrAppend(out, absl::StrFormat("%.2f", v)); });
  };
  if (j.contains("disk_probe_segments_GBps") && !j["disk_probe_segments_GBps"].empty()) {
    line("disk probe segments", segments("disk_probe_segments_GBps") + " GB/s, before the run");
  }
  if (j.contains("disk_probe_after_segments_GBps") && !j["disk_probe_after_segments_GBps"].empty()) {
    line("", segments("disk_probe_after_segments_GBps") + " GB/s, after (the floor: the faster median)");
  }
  if (j.contains("sparse_ffn") && !j["sparse_ffn"].is_null()) {
    const auto& sp = j["sparse_ffn"];
    line("sparse FFN", absl::StrFormat("%s %.3g: %.1f MiB of bundles per step, %.1f%% of the dense FFN's %.1f MiB",
                                       sp["mode"].get<std::string>(), sp["density_or_k"].get<double>(),
                                       sp["bundle_bytes_per_step"].get<double>() / 1048576,
                                       100 * sp["fetched_fraction"].get<double>(),
                                       sp["dense_ffn_bytes_per_step"].get<double>() / 1048576));
    if (sp["device_cache_fraction"].get<double>() > 0) {
      line("bundle cache on the device", absl::StrFormat("%.0f%% of each FFN, %.1f%% of the selected neurons found there",
                                                         100 * sp["device_cache_fraction"].get<double>(),
                                                         100 * sp["device_cache_hit_rate"].get<double>()));
    }
    std::string dense;
    for (int l : sp["layers_run_dense"]) absl::StrAppend(&dense, dense.empty() ? "" : ",", l);
    line("layers run dense", absl::StrFormat("%s (measured union >= %.0f%% of the FFN)", dense.empty() ? "none" : dense.c_str(),
                                             100 * sp["dense_above"].get<double>()));
  }
  line("floor per step", absl::StrFormat("%.4f s; achieved/floor %.2fx%s", j["floor_step_s"].get<double>(),
                                         j["step_over_floor"].get<double>(),
                                         j.value("floor_doubtful", false)
                                             ? " (faster than the probed links allow: a probe under-read, the floor is doubtful)"
                                             : ""));
  line("decode busy", absl::StrFormat("disk %.3f s, copy %.3f s, compute %.3f s", j["decode_busy_s"]["disk"].get<double>(),
                                      j["decode_busy_s"]["copy"].get<double>(), j["decode_busy_s"]["compute"].get<double>()));
  if (j.contains("predicted")) {
    const auto& p = j["predicted"];
    line("predicted (cost model)", absl::StrFormat("prefill %.3f s, step %.4f s, %.2f tok/s, bound by %s", p["prefill_s"].get<double>(),
                                                   p["decode_step_s"].get<double>(), p["throughput_tok_s"].get<double>(),
                                                   p["bound"].get<std::string>()));
    line("measured / predicted", absl::StrFormat("prefill %.2fx, step %.2fx, throughput %.2fx", j["measured_over_predicted"]["prefill"].get<double>(),
                                                 j["measured_over_predicted"]["decode_step"].get<double>(),
                                                 j["measured_over_predicted"]["throughput"].get<double>()));
  }
  if (j.value("policy", "manual") == "auto") line("policy", "auto (ferry plan's choice)");
  line("memory plan", absl::StrFormat("device %.1f MiB, pinned %.1f MiB", j["memory"]["plan_device"].get<double>() / 1048576,
                                      j["memory"]["plan_pinned"].get<double>() / 1048576));
  return s;
}

}  // namespace ferry::engine
