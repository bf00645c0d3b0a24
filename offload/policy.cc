#include "offload/policy.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace ferry::offload {
namespace {

constexpr uint64_t kAlign = 4096;

std::string MiB(uint64_t b) { return absl::StrCat(static_cast<int64_t>(std::llround(b / 1048576.0)), " MiB"); }

// floor(bytes * percent / 100) down to 4 KiB; exact at 0 and 100.
uint64_t Cut(uint64_t bytes, double percent) {
  if (percent >= 100.0) return bytes;
  if (percent <= 0.0) return 0;
  const uint64_t raw = static_cast<uint64_t>(std::floor(static_cast<long double>(bytes) * percent / 100.0L));
  return raw / kAlign * kAlign;
}

}  // namespace

absl::StatusOr<WeightSplit> ParseWeightSplit(const std::string& text) {
  std::vector<std::string> parts = absl::StrSplit(text, ',');
  WeightSplit s;
  double* fields[] = {&s.gpu, &s.cpu, &s.disk};
  if (parts.size() != 3) return absl::InvalidArgumentError(absl::StrCat("--weights wants GPU,CPU,DISK percentages, got \"", text, "\""));
  for (int i = 0; i < 3; ++i) {
    if (!absl::SimpleAtod(parts[i], fields[i]) || !std::isfinite(*fields[i]) || *fields[i] < 0 || *fields[i] > 100) {
      return absl::InvalidArgumentError(absl::StrCat("--weights: \"", parts[i], "\" is not a percentage in [0, 100]"));
    }
  }
  if (std::abs(s.gpu + s.cpu + s.disk - 100.0) > 1e-6) {
    return absl::InvalidArgumentError(absl::StrCat("--weights percentages must sum to 100, got ", s.gpu + s.cpu + s.disk));
  }
  return s;
}

absl::StatusOr<uint64_t> ParseBytes(const std::string& text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  static const std::pair<const char*, double> kUnits[] = {
      {"TiB", 1099511627776.0}, {"GiB", 1073741824.0}, {"MiB", 1048576.0}, {"KiB", 1024.0}, {"TB", 1e12}, {"GB", 1e9},
      {"MB", 1e6},            {"KB", 1e3},           {"T", 1099511627776.0}, {"G", 1073741824.0}, {"M", 1048576.0},
      {"K", 1024.0},          {"B", 1.0}};
  double scale = 1.0;
  for (const auto& [suffix, mult] : kUnits) {
    if (absl::ConsumeSuffix(&t, suffix)) {
      scale = mult;
      break;
    }
  }
  double v;
  if (!absl::SimpleAtod(t, &v) || v < 0 || !std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is not a size (like 24GiB, 512MiB, 1000000)"));
  }
  const double bytes = v * scale;
  if (bytes >= 9.2e18) return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is larger than any memory (at most 8 EiB)"));
  if (bytes < 1) return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is zero; give a positive size (leave the flag out for no limit)"));
  return static_cast<uint64_t>(bytes);
}

absl::StatusOr<Plan> MakePlan(const PlanInputs& in) {
  const WeightSplit& s = in.split;
  if (!(std::abs(s.gpu + s.cpu + s.disk - 100.0) <= 1e-6) || !(s.gpu >= 0) || !(s.cpu >= 0) || !(s.disk >= 0)) {
    return absl::InvalidArgumentError("weight split percentages must be >= 0 and sum to 100");
  }
  Plan p;
  uint64_t max_streamed = 0, max_disk = 0;
  if (!in.layer_begin.empty() && in.layer_begin.size() != in.layer_bytes.size()) {
    return absl::InvalidArgumentError("layer_begin must give one offset per layer");
  }
  for (size_t i = 0; i < in.layer_bytes.size(); ++i) {
    const uint64_t bytes = in.layer_bytes[i];
    if (bytes % kAlign != 0) return absl::InvalidArgumentError("layer blocks must be multiples of 4 KiB");
    LayerPlacement l;
    l.begin = in.layer_begin.empty() ? 0 : in.layer_begin[i];
    if (l.begin % kAlign != 0) return absl::InvalidArgumentError("layer ranges must start at 4 KiB multiples");
    l.bytes = bytes;
    l.gpu_end = Cut(bytes, s.gpu);
    l.cpu_end = s.disk <= 0.0 ? bytes : std::max(l.gpu_end, Cut(bytes, s.gpu + s.cpu));
    p.resident_bytes += l.gpu_end;
    p.pinned_bytes += l.cpu_bytes();
    if (l.streamed()) max_streamed = std::max(max_streamed, bytes);
    max_disk = std::max(max_disk, l.disk_bytes());
    p.layers.push_back(l);
  }
  p.working_bytes = 2 * max_streamed;
  p.staging_bytes = 2 * max_disk;
  p.device_bytes = in.other_device_bytes + p.resident_bytes + p.working_bytes;
  p.host_bytes = p.pinned_bytes + p.staging_bytes + in.other_host_bytes;
  if (in.device_budget > 0 && p.device_bytes > in.device_budget) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the policy does not fit the GPU memory budget of ", MiB(in.device_budget), ": it needs ", MiB(p.device_bytes),
        " (resident weights ", MiB(p.resident_bytes), ", streaming slots ", MiB(p.working_bytes), ", other weights, KV and activations ",
        MiB(in.other_device_bytes), "), over by ", MiB(p.device_bytes - in.device_budget),
        "; move weights to CPU or disk, or shrink the batch"));
  }
  if (in.host_budget > 0 && p.host_bytes > in.host_budget) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the policy does not fit the CPU memory budget of ", MiB(in.host_budget), ": it needs ", MiB(p.host_bytes),
        " pinned (CPU-tier weights ", MiB(p.pinned_bytes), ", disk staging ", MiB(p.staging_bytes), ", KV cache ",
        MiB(in.other_host_bytes), "), over by ",
        MiB(p.host_bytes - in.host_budget), "; move weights to disk or GPU"));
  }
  return p;
}

std::string Plan::Describe() const {
  return absl::StrCat("device ", MiB(device_bytes), " (resident weights ", MiB(resident_bytes), ", slots ", MiB(working_bytes),
                      "), pinned ", MiB(host_bytes), " (CPU tier ", MiB(pinned_bytes), ", staging ", MiB(staging_bytes), ")");
}

}  // namespace ferry::offload
