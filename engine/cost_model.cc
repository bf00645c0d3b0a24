#include "engine/cost_model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status.h"

namespace ferry::engine {
namespace {

using nlohmann::json;

absl::Status Missing(const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("the probe has no usable ", what, ": measure again with ferry probe --reprobe (same --device and --dir)"));
}

// A positive finite number at j[key], else an error naming `what`.
absl::StatusOr<double> Rate(const json& j, const char* key, const std::string& what) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number()) return Missing(what);
  const double v = j[key].get<double>();
  if (!std::isfinite(v) || v <= 0) return Missing(what);
  return v;
}

absl::StatusOr<uint64_t> Size(const json& j, const char* key, const std::string& what) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number_integer()) return Missing(what);
  const int64_t v = j[key].get<int64_t>();
  if (v <= 0) return Missing(what);
  return static_cast<uint64_t>(v);
}

// Type-checked reads of the probe: a field of another type reads as absent.
std::string Str(const json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : std::string();
}
const json& Arr(const json& j, const char* key) {
  static const json* const kEmpty = new json(json::array());
  return j.is_object() && j.contains(key) && j[key].is_array() ? j[key] : *kEmpty;
}
bool Flag(const json& j, const char* key) { return j.is_object() && j.contains(key) && j[key].is_boolean() && j[key].get<bool>(); }

std::string LinearKey(DType dtype, const std::optional<QuantFormat>& quant) {
  if (quant) return QuantFormatName(*quant).substr(0, 2);  // "q4", "q8"
  return dtype == DType::kF32 ? "F32" : "F16";              // F16 and BF16 stream alike
}

std::string KvKey(const KvType& t) { return t.quant ? KvTypeName(t).substr(0, 2) : DTypeName(t.dtype); }

// Backend ops a layer issues per GPU batch besides its linears and attention (norms, adds, the
// KV write, rotations, activations); each costs about one small op.
int OpsPerLayer(const ModelConfig& c, const Policy& p) {
  int ops = 8;
  if (!c.learned_positions()) ops += 2;
  if (c.qk_norm) ops += 2;
  if (c.ffn == FfnKind::kSwiGlu) ops += 1;
  if (p.h2o) ops += 2;
  if (p.kv_on_cpu) ops += 4;  // q, k, v to the host and the output back
  return ops;
}

// --kv-dtype's spelling of a KV type: f32, f16, q8, q4.
std::string KvFlag(const KvType& t) {
  const std::string name = absl::AsciiStrToLower(KvTypeName(t));
  return t.quant ? name.substr(0, 2) : name;
}

}  // namespace

std::string Policy::Flags(bool dummy) const {
  std::string s = absl::StrFormat("--weights %g,%g,%g --gpu-batch-size %d --num-gpu-batches %d --kv %s --kv-dtype %s", split.gpu,
                                  split.cpu, split.disk, gpu_batch_size, num_gpu_batches, kv_on_cpu ? "cpu" : "gpu",
                                  KvFlag(kv_dtype));
  if (h2o) absl::StrAppend(&s, " --h2o ", h2o->heavy, ",", h2o->recent);
  if (weights) absl::StrAppend(&s, " --quantize ", QuantFormatName(*weights).substr(0, 2), " --quant-group ", weights->group);
  if (sparsity > 0) absl::StrAppend(&s, absl::StrFormat(" %s %g", dummy ? "--sparsity-sim" : "--sparsity-k", sparsity));
  if (sparsity_cache > 0) absl::StrAppend(&s, absl::StrFormat(" --sparsity-cache %g", sparsity_cache));
  return s;
}

offload::KvCacheSpec PolicyKvSpec(const ModelConfig& c, const Policy& p, const Workload& w) {
  const int b = p.batch(), max_len = w.prompt_len + w.gen_len;
  offload::KvCacheSpec spec = KvSpec(c, b, max_len, p.kv_dtype);
  spec.on_host = p.kv_on_cpu;
  if (p.h2o) spec.h2o = offload::ClampToLength(*p.h2o, max_len);
  spec.prefill_rows = p.gpu_batch_size;
  spec.max_prompt = w.prompt_len;
  return spec;
}

OffloadOptions PolicyOffload(const ModelConfig& c, const Policy& p, const Workload& w, uint64_t device_budget, uint64_t host_budget) {
  OffloadOptions o;
  o.split = p.split;
  o.device_budget = device_budget;
  o.host_budget = host_budget;
  const offload::KvBytes kv = offload::KvCacheBytes(PolicyKvSpec(c, p, w));
  const int64_t b = p.batch();
  // The prefill runs the whole batch in one pass (weights cross the link once), a GPU batch at a time.
  o.reserve_device_bytes = kv.device + Model::ForwardWorkspaceBytes(c, b * w.prompt_len, b, int64_t{p.gpu_batch_size} * w.prompt_len);
  o.reserve_host_bytes = kv.host;
  o.sparse_ffn = p.sparsity > 0;
  o.sparse_cache_fraction = p.sparsity_cache;
  return o;
}

json Prediction::ToJson() const {
  auto stages = [](const StageTimes& s) {
    return json{{"disk_s", s.disk}, {"copy_s", s.copy}, {"compute_s", s.compute}, {"attention_s", s.attention}, {"layer_s", s.layer}};
  };
  return {{"prefill_s", prefill_s},
          {"decode_step_s", step_s},
          {"round_s", round_s},
          {"throughput_tok_s", throughput_tok_s},
          {"bound", bound},
          {"floor_step_s", floor_step_s},
          {"prefill_layer", stages(prefill_layer)},
          {"decode_layer", stages(decode_layer)},
          {"prefill_head_s", prefill_head_s},
          {"decode_head_s", decode_head_s},
          {"bytes_per_step", {{"disk_to_pinned", disk_bytes_per_step}, {"pinned_to_device", h2d_bytes_per_step}}},
          {"memory", {{"device", device_bytes}, {"pinned", host_bytes}}},
          {"ffn_union", ffn_union}};
}

// Points (rows, seconds per call or per element of one call) sorted by rows: a call over more rows
// does all the work of one over fewer, so a point dearer than one at more rows was timed in a slow
// phase of the machine (the 2-core VM's come and go for seconds: one probe timed the Deja Vu FFN
// at 1 row at twice its 16-row time); it takes the cheaper time.
void CostModel::NoCheaperWithMoreRows(std::vector<Point>& pts) {
  for (size_t i = pts.size(); i-- > 1;) pts[i - 1].y = std::min(pts[i - 1].y, pts[i].y);
}

absl::StatusOr<CostModel> CostModel::FromProbe(const json& j) {
  if (!j.is_object() || Str(j, "format") != "ferry-probe") return Missing("probe (not a ferry probe)");
  if (j.contains("options") && Flag(j["options"], "quick")) {
    return absl::InvalidArgumentError("a --quick probe is a smoke run, not for planning: ferry probe --reprobe");
  }
  CostModel m;
  if (!j.contains("copies") || !j["copies"].is_object()) return Missing("copy rates");
  for (const auto& [key, pts] : {std::pair{"host_to_device", &m.h2d_}, std::pair{"device_to_host", &m.d2h_},
                                 std::pair{"within_device", &m.d2d_}}) {
    const json& arr = Arr(j["copies"], key);
    if (arr.empty()) return Missing(absl::StrCat(key, " copy rates"));
    for (const json& e : arr) {
      FERRY_ASSIGN_OR_RETURN(const uint64_t chunk, Size(e, "chunk_bytes", absl::StrCat(key, " chunk size")));
      FERRY_ASSIGN_OR_RETURN(const double gbps, Rate(e, "GBps", absl::StrCat(key, " copy rate")));
      pts->push_back({static_cast<double>(chunk), gbps * 1e9});
    }
    std::sort(pts->begin(), pts->end(), [](const Point& a, const Point& b) { return a.x < b.x; });
  }
  if (j.contains("disk")) {
    const json& reads = Arr(j["disk"], "reads");
    for (const json& e : reads) {
      FERRY_ASSIGN_OR_RETURN(const uint64_t block, Size(e, "block_bytes", "disk block size"));
      FERRY_ASSIGN_OR_RETURN(const uint64_t depth, Size(e, "queue_depth", "disk queue depth"));
      FERRY_ASSIGN_OR_RETURN(const double gbps, Rate(e, "GBps", "disk read rate"));
      if (depth > 65536) return Missing("disk queue depth");
      m.disk_.push_back({block, static_cast<unsigned>(depth), gbps * 1e9});
    }
    if (j["disk"].is_object() && j["disk"].contains("pages")) {
      FERRY_ASSIGN_OR_RETURN(const double gbps, Rate(j["disk"]["pages"], "GBps", "disk page read rate"));
      m.disk_pages_ = gbps * 1e9;
    }
  }
  const json& linear = Arr(j, "linear");
  for (const json& e : linear) {
    FERRY_ASSIGN_OR_RETURN(const uint64_t rows, Size(e, "rows", "linear rows"));
    FERRY_ASSIGN_OR_RETURN(const uint64_t out, Size(e, "out", "linear shape"));
    FERRY_ASSIGN_OR_RETURN(const uint64_t in, Size(e, "in", "linear shape"));
    FERRY_ASSIGN_OR_RETURN(const double gflops, Rate(e, "GFLOPs", "linear rate"));
    if (!e.contains("weights") || !e["weights"].is_string()) return Missing("linear weight type");
    std::string type = e["weights"].get<std::string>();
    if (type.size() > 2 && type[0] == 'q') type = type.substr(0, 2);
    const double seconds = 2.0 * static_cast<double>(rows) * static_cast<double>(out) * static_cast<double>(in) / (gflops * 1e9);
    const double elems = static_cast<double>(out) * static_cast<double>(in);
    m.linear_[type][elems].push_back({static_cast<double>(rows), seconds / elems});
  }
  for (const char* type : {"F32", "F16"}) {
    if (m.linear_[type].empty()) return Missing(absl::StrCat(type, " linear rates"));
  }
  for (auto& [type, sizes] : m.linear_) {
    for (auto& [elems, pts] : sizes) {
      std::sort(pts.begin(), pts.end(), [](const Point& a, const Point& b) { return a.x < b.x; });
      NoCheaperWithMoreRows(pts);
    }
  }
  for (const auto& [key, map] : {std::pair{"attention", &m.attention_}, std::pair{"host_attention", &m.host_attention_}}) {
    const json& arr = Arr(j, key);
    for (const json& e : arr) {
      if (!e.contains("kv_dtype") || !e["kv_dtype"].is_string()) return Missing(absl::StrCat(key, " KV type"));
      std::string type = e["kv_dtype"].get<std::string>();
      if (type.size() > 2 && type[0] == 'q') type = type.substr(0, 2);
      FERRY_ASSIGN_OR_RETURN(const double gbps, Rate(e, "kv_GBps", absl::StrCat(key, " rate")));
      (*map)[type] = gbps * 1e9;
    }
    if (!map->count("F32")) return Missing(absl::StrCat(key, " rate of an F32 cache"));
  }
  // Prefill attention by head_dim (probe v9 has 128 and 32; older probes one point, at 128): the
  // seconds of one query-key pair of one head, 4 x head_dim FLOPs at the probed rate.
  for (const json& e : Arr(j, "prefill_attention")) {
    FERRY_ASSIGN_OR_RETURN(const double gflops, Rate(e, "GFLOPs", "prefill attention rate"));
    double hd = 128;
    if (e.is_object() && e.contains("head_dim")) {
      FERRY_ASSIGN_OR_RETURN(hd, Rate(e, "head_dim", "prefill attention head_dim"));
    }
    m.prefill_attention_.push_back({hd, 4.0 * hd / (gflops * 1e9)});
  }
  if (m.prefill_attention_.empty()) return Missing("prefill attention rate");
  std::stable_sort(m.prefill_attention_.begin(), m.prefill_attention_.end(), [](const Point& a, const Point& b) { return a.x < b.x; });
  m.prefill_attention_.erase(std::unique(m.prefill_attention_.begin(), m.prefill_attention_.end(), [](const Point& a, const Point& b) { return a.x == b.x; }),
                             m.prefill_attention_.end());
  for (size_t i = 1; i < m.prefill_attention_.size(); ++i) {  // a wider head never costs less per pair
    m.prefill_attention_[i].y = std::max(m.prefill_attention_[i].y, m.prefill_attention_[i - 1].y);
  }
  FERRY_ASSIGN_OR_RETURN(m.op_seconds_, Rate(j, "op_seconds", "small-op cost"));
  for (const json& e : Arr(j, "ops")) {  // by rows (probe v8); without them every op costs op_seconds
    FERRY_ASSIGN_OR_RETURN(const uint64_t rows, Size(e, "rows", "small-op rows"));
    FERRY_ASSIGN_OR_RETURN(const double seconds, Rate(e, "seconds", "small-op cost"));
    m.ops_.push_back({static_cast<double>(rows), seconds});
  }
  std::sort(m.ops_.begin(), m.ops_.end(), [](const Point& a, const Point& b) { return a.x < b.x; });
  NoCheaperWithMoreRows(m.ops_);
  for (const json& e : Arr(j, "bundled_ffn")) {
    if (!e.contains("bundles") || !e["bundles"].is_string()) return Missing("bundled FFN bundle type");
    FERRY_ASSIGN_OR_RETURN(const uint64_t rows, Size(e, "rows", "bundled FFN rows"));
    FERRY_ASSIGN_OR_RETURN(const uint64_t neurons, Size(e, "neurons", "bundled FFN neurons"));
    FERRY_ASSIGN_OR_RETURN(const uint64_t d, Size(e, "d", "bundled FFN width"));
    FERRY_ASSIGN_OR_RETURN(const double seconds, Rate(e, "seconds", "bundled FFN time"));
    m.bundled_[e["bundles"].get<std::string>()][static_cast<double>(rows)].push_back(
        {static_cast<double>(neurons), seconds / (static_cast<double>(neurons) * static_cast<double>(d))});
  }
  for (auto& [type, by_rows] : m.bundled_) {
    for (auto& [rows, pts] : by_rows) std::sort(pts.begin(), pts.end(), [](const Point& a, const Point& b) { return a.x < b.x; });
    // The same neurons over more rows: no cheaper (per neuron-dimension at the same count).
    for (auto it = std::next(by_rows.rbegin()); it != by_rows.rend(); ++it) {
      for (Point& pt : it->second) {
        for (const Point& more : std::prev(it)->second) {
          if (more.x == pt.x) pt.y = std::min(pt.y, more.y);
        }
      }
    }
  }
  FERRY_ASSIGN_OR_RETURN(const double hash, Rate(j, "hash_GBps", "XXH3 rate"));
  m.hash_rate_ = hash * 1e9;
  m.shared_cores_ = Str(j, "backend") == "cpu";
  return m;
}

double CostModel::Interpolate(const std::vector<Point>& pts, double x) {
  if (x <= pts.front().x) return pts.front().y;
  if (x >= pts.back().x) return pts.back().y;
  for (size_t i = 1; i < pts.size(); ++i) {
    if (x <= pts[i].x) {
      const double t = (std::log(x) - std::log(pts[i - 1].x)) / (std::log(pts[i].x) - std::log(pts[i - 1].x));
      return pts[i - 1].y + t * (pts[i].y - pts[i - 1].y);
    }
  }
  return pts.back().y;
}

double CostModel::H2DBytesPerSecond(uint64_t chunk) const { return Interpolate(h2d_, static_cast<double>(std::max<uint64_t>(chunk, 1))); }
double CostModel::D2HBytesPerSecond(uint64_t chunk) const { return Interpolate(d2h_, static_cast<double>(std::max<uint64_t>(chunk, 1))); }
double CostModel::D2DBytesPerSecond(uint64_t chunk) const { return Interpolate(d2d_, static_cast<double>(std::max<uint64_t>(chunk, 1))); }

double CostModel::DiskPageBytesPerSecond() const {
  if (disk_pages_ > 0) return disk_pages_;
  if (disk_.empty()) return 0;
  const auto smallest = std::min_element(disk_.begin(), disk_.end(), [](const DiskPoint& a, const DiskPoint& b) {
    return a.block < b.block || (a.block == b.block && a.depth > b.depth);
  });
  return smallest->rate;
}

double CostModel::DiskBytesPerSecond(uint64_t block, unsigned depth) const {
  // The probed point nearest in (log block, log depth).
  double best = 0, best_d = 1e300;
  for (const DiskPoint& p : disk_) {
    const double d = std::pow(std::log(static_cast<double>(p.block) / std::max<uint64_t>(block, 1)), 2) +
                     std::pow(std::log(static_cast<double>(p.depth) / std::max(depth, 1u)), 2);
    if (d < best_d) best_d = d, best = p.rate;
  }
  return best;
}

double CostModel::PerElement(const std::vector<Point>& pts, double r) {
  if (r <= pts.front().x) return pts.front().y;                          // fewer rows are no cheaper
  if (r >= pts.back().x) return pts.back().y * r / pts.back().x;         // compute-bound: time grows with the rows
  for (size_t i = 1; i < pts.size(); ++i) {
    if (r <= pts[i].x) return pts[i - 1].y + (r - pts[i - 1].x) / (pts[i].x - pts[i - 1].x) * (pts[i].y - pts[i - 1].y);
  }
  return pts.back().y;
}

double CostModel::LinearSeconds(int64_t rows, int64_t out, int64_t in, DType dtype, const std::optional<QuantFormat>& quant) const {
  auto it = linear_.find(LinearKey(dtype, quant));
  if (it == linear_.end() || it->second.empty()) it = linear_.find("F16");  // checked present in FromProbe
  const std::map<double, std::vector<Point>>& sizes = it->second;
  const double r = static_cast<double>(std::max<int64_t>(rows, 1)), elems = static_cast<double>(out) * static_cast<double>(in);
  // Seconds per element at the probed sizes around this one, interpolated in log size.
  auto hi = sizes.lower_bound(elems);
  if (hi == sizes.begin()) return PerElement(hi->second, r) * elems;
  if (hi == sizes.end()) return PerElement(std::prev(hi)->second, r) * elems;
  auto lo = std::prev(hi);
  const double t = (std::log(elems) - std::log(lo->first)) / (std::log(hi->first) - std::log(lo->first));
  return (PerElement(lo->second, r) + t * (PerElement(hi->second, r) - PerElement(lo->second, r))) * elems;
}

int64_t CostModel::BundledFfnRows() const {
  double rows = 0;
  for (const auto& [type, by_rows] : bundled_) {
    if (!by_rows.empty()) rows = std::max(rows, by_rows.rbegin()->first);
  }
  return static_cast<int64_t>(rows);
}

double CostModel::OpSeconds(int64_t rows) const {
  if (ops_.empty()) return op_seconds_;
  const double r = static_cast<double>(std::max<int64_t>(rows, 1));
  if (r <= ops_.front().x) return ops_.front().y;
  for (size_t i = 1; i < ops_.size(); ++i) {
    if (r <= ops_[i].x) return ops_[i - 1].y + (r - ops_[i - 1].x) / (ops_[i].x - ops_[i - 1].x) * (ops_[i].y - ops_[i - 1].y);
  }
  return ops_.back().y;  // more rows: the issue costs the same; their bytes are the elementwise passes'
}

double CostModel::AttentionSeconds(uint64_t kv_bytes, const KvType& type, bool on_host) const {
  const auto& map = on_host ? host_attention_ : attention_;
  auto it = map.find(KvKey(type));
  if (it == map.end()) it = map.find("F32");
  return static_cast<double>(kv_bytes) / it->second;
}

double CostModel::PrefillAttentionSeconds(int64_t heads, int64_t head_dim, int64_t tokens) const {
  const std::vector<Point>& pts = prefill_attention_;
  const double hd = static_cast<double>(std::max<int64_t>(head_dim, 1));
  double per_pair;  // seconds of one query-key pair of one head
  if (hd >= pts.back().x || pts.size() == 1) {
    per_pair = pts.back().y * hd / pts.back().x;  // the widest (or only) point's FLOP rate
  } else if (hd <= pts.front().x) {
    per_pair = pts.front().y;  // the narrowest point's per-pair cost: the part that does not scale
  } else {
    size_t i = 1;
    while (pts[i].x < hd) ++i;
    const double t = (hd - pts[i - 1].x) / (pts[i].x - pts[i - 1].x);
    per_pair = pts[i - 1].y + t * (pts[i].y - pts[i - 1].y);
  }
  const double l = static_cast<double>(std::max<int64_t>(tokens, 0));
  return static_cast<double>(std::max<int64_t>(heads, 0)) * (l * (l + 1) / 2) * per_pair;
}

std::optional<double> CostModel::BundledFfnSeconds(int64_t rows, int64_t m, int64_t d, DType dtype,
                                                   const std::optional<QuantFormat>& quant) const {
  auto it = bundled_.find(quant ? "q4" : "F16");
  if (it == bundled_.end() || it->second.empty()) return std::nullopt;
  const double scale = quant ? 1.0 : static_cast<double>(DTypeSize(dtype)) / 2.0;
  const double mm = static_cast<double>(std::max<int64_t>(m, 1)), r = static_cast<double>(std::max<int64_t>(rows, 1));
  std::vector<Point> by_rows;  // (rows, seconds per neuron-dimension at m)
  for (const auto& [probed_rows, pts] : it->second) by_rows.push_back({probed_rows, Interpolate(pts, mm)});
  double per = by_rows.front().y;
  if (by_rows.size() > 1 && r > by_rows.front().x) {
    size_t i = 1;
    while (i + 1 < by_rows.size() && r > by_rows[i].x) ++i;
    const Point& a = by_rows[i - 1];
    const Point& b = by_rows[i];
    per = std::max(a.y, a.y + (r - a.x) / (b.x - a.x) * (b.y - a.y));  // linear in rows, extended above the last
  }
  return per * mm * static_cast<double>(d) * scale;
}

// Shared cores (the CPU stand-in): the disk stage's rate beside the compute over its rate alone.
// Not probed (a probe of reads beside a loop of linears measured them at 0.86-1.32x their rate alone,
// while the streamer beside a forward runs slower): the streamer's own measurements on the 2-core
// dev VM, about half the probed rate (session 11) and 1.95 GB/s against 2.89 (session 12, huge
// pages); 0 had charged the whole disk stage after the compute (disk rows over-predicted by 6-22%).
constexpr double kDiskBesideCompute = 0.5;

absl::StatusOr<Prediction> CostModel::Predict(const ModelConfig& c, const WeightLayout& layout, const Policy& p, const Workload& w,
                                              const offload::Plan& plan, const io::UringOptions& uring) const {
  if (p.gpu_batch_size < 1 || p.num_gpu_batches < 1 || w.prompt_len < 1 || w.gen_len < 1) {
    return absl::InvalidArgumentError("a policy needs positive batch sizes and a workload positive lengths");
  }
  if (plan.layers.size() != layout.layer_bytes.size()) return absl::InvalidArgumentError("the plan is not of this layout");
  const int64_t gbs = p.gpu_batch_size, ngb = p.num_gpu_batches, b = p.batch();
  const int d = c.hidden_size, ffn = c.ffn_dim * (c.ffn == FfnKind::kSwiGlu ? 2 : 1);
  const int max_len = w.prompt_len + w.gen_len;
  int64_t attended = w.prompt_len + w.gen_len / 2;  // mean positions a decode step attends to
  if (p.h2o) {
    const offload::H2OOptions h = offload::ClampToLength(*p.h2o, max_len);
    attended = std::min<int64_t>(attended, h.heavy + h.recent);
  }
  // One position's keys (or values): a quantized cache's bytes per position over many positions
  // (a single row's layout is padded to 4 KiB: 5.3x a q8 row of opt-125m's 768 values).
  constexpr int64_t kRows = 4096;
  const double kv_row = static_cast<double>(p.kv_dtype.Bytes(kRows, c.kv_width())) / kRows;
  // Deja Vu: the FFN's matrices stay out of the stream (the plan's layers are the attention
  // parts) and live as neuron bundles, pinned or (with a disk share) in ffn_bundles.bin.
  const io::PlannedTensor* up = nullptr;
  if (p.sparsity > 0) {
    for (const io::PlannedTensor& t : layout.layer_matrices) {
      if (t.role == offload::RoleName(offload::Role::kUp) && t.shape.size() == 2) up = &t;
    }
    if (up == nullptr || !(p.sparsity <= 1.0)) return absl::InvalidArgumentError("a sparse policy needs a ReLU FFN's up matrices and a fraction in (0, 1]");
  }
  auto is_ffn = [&](const io::PlannedTensor& t) {
    return up != nullptr && (t.role == offload::RoleName(offload::Role::kUp) || t.role == offload::RoleName(offload::Role::kDown));
  };
  // One layer's compute over `tokens` tokens in each of ngb GPU batches, its attention apart.
  auto linears = [&](int64_t tokens) {
    double s = 0;
    for (const io::PlannedTensor& t : layout.layer_matrices) {
      if (!is_ffn(t)) s += LinearSeconds(tokens, t.shape[0], t.shape[1], t.dtype, t.quant);
    }
    return s;
  };
  // One GPU batch's bundles: the union of its rows' neurons (independent draws of p.sparsity each,
  // 1 - (1 - k)^rows, which is what --sparsity-sim draws; trained predictors choose correlated
  // sets and fetch fewer; a union of 0.9 or more runs dense, as bench's --sparsity-dense-above),
  // less the device cache's share of hits; fetched before the FFN runs over them (the forward
  // waits: it adds to the compute), from pinned memory or page by page from the disk.
  struct Bundled {
    double seconds = 0;
    double union_fraction = 0;
    uint64_t h2d = 0, disk = 0;
  };
  const bool bundles_on_disk = p.split.disk > 0;
  auto bundled = [&](int64_t rows, bool decode) -> Bundled {
    Bundled b;
    if (up == nullptr) return b;
    const int64_t f = up->shape[0], dd = up->shape[1];
    const uint64_t bundle = offload::FfnBundles::BundleBytes(static_cast<int>(dd), up->dtype, up->quant);
    double u = decode ? 1.0 - std::pow(1.0 - p.sparsity, static_cast<double>(rows)) : 1.0;
    if (u >= 0.9) u = 1.0;
    b.union_fraction = u;
    const double m = u * static_cast<double>(f), miss = decode && u < 1.0 ? 1.0 - std::clamp(p.sparsity_cache, 0.0, 1.0) : 1.0;
    b.h2d = static_cast<uint64_t>(m * miss * static_cast<double>(bundle));
    const uint64_t all = static_cast<uint64_t>(m * static_cast<double>(bundle));
    const double gather = b.h2d > 0 ? b.h2d / H2DBytesPerSecond(b.h2d) : 0.0, gather_all = all > 0 ? all / H2DBytesPerSecond(all) : 0.0;
    if (bundles_on_disk && b.h2d > 0) {
      const double page = 4096.0, pages = std::ceil(static_cast<double>(f) * bundle / page);
      const double per_page = std::max(1.0, page / static_cast<double>(bundle));
      const double touched = bundle >= page ? u * miss : 1.0 - std::pow(1.0 - u * miss, per_page);
      b.disk = static_cast<uint64_t>(std::min(pages, std::ceil(pages * touched)) * page);
      // Scattered pages: at the page-read rate (IOPS), not the streamer's sequential one.
      const double rate = u < 1.0 ? DiskPageBytesPerSecond() : DiskBytesPerSecond(uring.block_bytes, uring.queue_depth);
      if (rate > 0) b.seconds += b.disk / rate;
    }
    // The gather and the FFN over the m neurons, as the probe timed them; without those points,
    // two linears of the bundles' type and the bundles unpacked (the CPU into the dense layouts,
    // the GPU's q4/q8 dequantization) at the within-device rate, after the copy above.
    // Past the probed rows (a prefill's tens to hundreds) the points' trend is kept only where it is
    // dearer than that GEMM model, which no FFN over gathered bundles can beat (the trend alone put
    // opt-125m's batch-8 prefill at half its dense one; the GEMM alone its batch-1 one at half the
    // measured).
    const int64_t mi = std::max<int64_t>(static_cast<int64_t>(std::llround(m)), 1);
    const uint64_t unpack = static_cast<uint64_t>(m * 2 * static_cast<double>(dd) * 4);
    const double gemm = gather + 2 * LinearSeconds(rows, mi, dd, up->dtype, up->quant) + (unpack > 0 ? unpack / D2DBytesPerSecond(unpack) : 0.0);
    if (const std::optional<double> probed = BundledFfnSeconds(rows, mi, dd, up->dtype, up->quant)) {
      const double timed = std::max(*probed - gather_all + gather, 0.0);  // the probe gathered every neuron; the cache's hits stay
      b.seconds += rows > BundledFfnRows() ? std::max(timed, gemm) : timed;
      return b;
    }
    b.seconds += gemm;
    return b;
  };
  const Bundled dec_bundles = bundled(gbs, true), pre_bundles = bundled(gbs * w.prompt_len, false);
  // Norms, adds, activations: about 12 model-width and 3 FFN-width fp32 passes per token.
  auto elementwise = [&](int64_t tokens) {
    const double bytes = 4.0 * static_cast<double>(tokens) * (12.0 * d + 3.0 * ffn);
    return bytes / D2DBytesPerSecond(static_cast<uint64_t>(bytes));
  };
  auto host_kv_traffic = [&](int64_t tokens) {  // q, k, v to the host, the output back (--kv cpu)
    if (!p.kv_on_cpu) return 0.0;
    const uint64_t down = static_cast<uint64_t>(tokens) * (c.q_width() + 2 * c.kv_width()) * 4, up = static_cast<uint64_t>(tokens) * c.q_width() * 4;
    return down / D2HBytesPerSecond(down) + up / H2DBytesPerSecond(up);
  };
  Prediction r;
  const int ops = OpsPerLayer(c, p);
  // Decode: each GPU batch's gbs rows attend over `attended` positions.
  StageTimes dec;
  dec.attention = ngb * AttentionSeconds(static_cast<uint64_t>(2.0 * static_cast<double>(gbs * attended) * kv_row), p.kv_dtype, p.kv_on_cpu);
  dec.compute = ngb * (linears(gbs) + dec_bundles.seconds + elementwise(gbs) + host_kv_traffic(gbs) + ops * OpSeconds(gbs)) + dec.attention;
  // Prefill: each GPU batch's gbs prompts, causal attention over their own tokens.
  StageTimes pre;
  pre.attention = ngb * gbs * PrefillAttentionSeconds(c.num_heads, c.head_dim(), w.prompt_len);
  pre.compute = ngb * (linears(gbs * w.prompt_len) + pre_bundles.seconds + elementwise(gbs * w.prompt_len) +
                       host_kv_traffic(gbs * w.prompt_len) + ops * OpSeconds(gbs * w.prompt_len)) +
                pre.attention;
  // The stream: per layer the disk part read (and checked) and everything not resident copied in.
  const double disk_rate = DiskBytesPerSecond(uring.block_bytes, uring.queue_depth);
  double sum_disk = 0, sum_copy = 0, decode_layers = 0, prefill_layers = 0;
  uint64_t disk_bytes = 0, h2d_bytes = 0;
  for (const offload::LayerPlacement& l : plan.layers) {
    double disk = 0, copy = 0;
    if (l.streamed()) {
      if (l.disk_bytes() > 0) {
        if (disk_rate <= 0) return absl::InvalidArgumentError("the policy reads from the disk but the probe has no disk rates: ferry probe --dir DIR");
        disk = l.disk_bytes() / disk_rate + l.disk_bytes() / hash_rate_;
      }
      const uint64_t h2d = l.cpu_bytes() + l.disk_bytes();
      copy = h2d / H2DBytesPerSecond(h2d) + (l.gpu_end > 0 ? l.gpu_end / D2DBytesPerSecond(l.gpu_end) : 0.0);
      disk_bytes += l.disk_bytes();
      h2d_bytes += h2d;
    }
    auto cost = [&](double compute) {
      if (!l.streamed()) return compute;
      // On the CPU stand-in the compute does not overlap the copy (the same cores and memory bus),
      // and the disk stage (the reads and their checks, whose completions and hashing need the
      // cores the compute fills) progresses beside the compute at kDiskBesideCompute of its rate,
      // the rest of it after; disk and copy overlap.
      if (!shared_cores_) return std::max({disk, copy, compute});
      return compute + std::max(copy, std::max(0.0, disk - kDiskBesideCompute * compute));
    };
    decode_layers += cost(dec.compute);
    prefill_layers += cost(pre.compute);
    sum_disk += disk;
    sum_copy += copy;
    dec.disk = pre.disk = disk;
    dec.copy = pre.copy = copy;
  }
  const double layers = static_cast<double>(std::max<size_t>(plan.layers.size(), 1));
  disk_bytes += static_cast<uint64_t>(ngb) * plan.layers.size() * dec_bundles.disk;
  h2d_bytes += static_cast<uint64_t>(ngb) * plan.layers.size() * dec_bundles.h2d;
  r.ffn_union = dec_bundles.union_fraction;
  dec.layer = decode_layers / layers;
  pre.layer = prefill_layers / layers;
  // The head: final norm and lm_head over the batch's rows, the logits to the host, the argmax there.
  double head = OpSeconds(b) * 4;
  for (const io::PlannedTensor& t : layout.global_matrices) {
    const bool is_head = t.role == offload::RoleName(offload::Role::kLmHead) ||
                         (c.tie_word_embeddings && t.role == offload::RoleName(offload::Role::kTokEmbed));
    if (is_head) head += LinearSeconds(b, t.shape[0], t.shape[1], t.dtype, t.quant);
  }
  const uint64_t logits = static_cast<uint64_t>(b) * c.vocab_size * 4;
  head += logits / D2HBytesPerSecond(logits) + logits / D2DBytesPerSecond(logits);
  r.prefill_layer = pre;
  r.decode_layer = dec;
  r.prefill_head_s = r.decode_head_s = head;
  r.prefill_s = prefill_layers + head;
  r.step_s = decode_layers + head;
  r.round_s = r.prefill_s + (w.gen_len - 1) * r.step_s;
  const int64_t prompts = w.num_prompts > 0 ? w.num_prompts : b;
  const int64_t rounds = (prompts + b - 1) / b;
  r.throughput_tok_s = static_cast<double>(prompts) * w.gen_len / (static_cast<double>(rounds) * r.round_s);
  const double sum_compute = dec.compute * layers;
  r.bound = sum_disk >= std::max(sum_copy, sum_compute) ? "disk" : sum_copy >= sum_compute ? "pinned->device" : "compute";
  if (h2d_bytes == 0) r.bound = "compute";
  r.disk_bytes_per_step = disk_bytes;
  r.h2d_bytes_per_step = h2d_bytes;
  r.floor_step_s = std::max(disk_rate > 0 ? disk_bytes / disk_rate : 0.0, h2d_bytes / H2DBytesPerSecond(h2d_bytes / layers));
  r.device_bytes = plan.device_bytes;
  r.host_bytes = plan.host_bytes;
  return r;
}

}  // namespace ferry::engine
