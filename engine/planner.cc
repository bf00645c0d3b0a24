#include "engine/planner.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/status.h"
#include "engine/dummy_model.h"

namespace ferry::engine {
namespace {

std::string MiB(uint64_t b) { return absl::StrFormat("%.0f", b / 1048576.0); }

struct Needs {
  uint64_t device = 0, host = 0;
};

// The plan of a split without budgets (what it needs), and whether it fits them.
OffloadOptions OffloadOf(const PlanRequest& r, const Policy& p, uint64_t device_budget, uint64_t host_budget) {
  return r.offload ? r.offload(p, device_budget, host_budget) : PolicyOffload(r.config, p, r.workload, device_budget, host_budget);
}

absl::StatusOr<offload::Plan> Unbudgeted(const PlanRequest& r, const WeightLayout& layout, const Policy& p, const kernels::Backend& backend) {
  return Model::PlanOffload(layout, OffloadOf(r, p, 0, 0), backend);
}

bool Within(uint64_t need, uint64_t budget) { return budget == 0 || need <= budget; }

// Percentages kept to four decimals, rounded down (finer than 4 KiB for layers up to 40 MiB; the
// plan floors each share to 4 KiB): what --weights prints and parses back is the split checked.
double Down(double percent) { return std::floor(percent * 1e4 + 1e-9) / 1e4; }

}  // namespace

std::string Allowance::Describe() const {
  std::vector<std::string> parts;
  for (const QuantFormat& f : weights) parts.push_back(QuantFormatName(f).substr(0, 2));
  for (const KvType& t : kv_dtypes) {
    if (!(t == KvType(DType::kF32))) parts.push_back(absl::StrCat("kv-", absl::AsciiStrToLower(KvTypeName(t)).substr(0, t.quant ? 2 : 3)));
  }
  if (h2o > 0) parts.push_back(absl::StrCat("h2o=", h2o));
  if (sparsity > 0) parts.push_back(absl::StrCat("sparse=", sparsity));
  return parts.empty() ? "exact" : absl::StrJoin(parts, ",");
}

absl::StatusOr<Allowance> ParseAllowance(const std::string& spec, int head_dim, int quant_group) {
  Allowance a;
  if (spec.empty() || spec == "exact") return a;
  for (absl::string_view raw : absl::StrSplit(spec, ',')) {
    const std::string tok(absl::StripAsciiWhitespace(raw));
    if (tok == "q4" || tok == "q8") {
      FERRY_ASSIGN_OR_RETURN(const QuantFormat f, MakeQuantFormat(tok, quant_group));
      a.weights.push_back(f);
    } else if (tok == "kv-f16" || tok == "kv-q8" || tok == "kv-q4") {
      FERRY_ASSIGN_OR_RETURN(const KvType t, ParseKvType(tok.substr(3), head_dim));
      a.kv_dtypes.push_back(t);
    } else if (absl::StartsWith(tok, "h2o=")) {
      double f = 0;
      if (!absl::SimpleAtod(tok.substr(4), &f) || !(f > 0) || f >= 1) {
        return absl::InvalidArgumentError(absl::StrCat("--allow ", tok, ": H2O keeps a fraction of the context in (0, 1), e.g. h2o=0.2"));
      }
      a.h2o = f;
    } else if (absl::StartsWith(tok, "sparse=")) {
      double f = 0;
      if (!absl::SimpleAtod(tok.substr(7), &f) || !(f > 0) || f >= 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("--allow ", tok, ": Deja Vu keeps a fraction of the FFN's neurons per token in (0, 1), e.g. sparse=0.15"));
      }
      a.sparsity = f;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "--allow: unknown \"", tok, "\" (one or more of q4, q8, kv-f16, kv-q8, kv-q4, h2o=FRACTION, sparse=FRACTION; or exact)"));
    }
  }
  return a;
}

absl::StatusOr<Candidate> PlaceWeights(const PlanRequest& r, const WeightLayout& layout, Policy p, const CostModel* model,
                                       const kernels::Backend& backend) {
  auto needs = [&](double gpu, double cpu) -> absl::StatusOr<Needs> {
    p.split = {gpu, cpu, std::max(0.0, 100.0 - gpu - cpu)};
    if (p.split.disk < 1e-9) p.split = {gpu, 100.0 - gpu, 0.0};
    FERRY_ASSIGN_OR_RETURN(const offload::Plan plan, Unbudgeted(r, layout, p, backend));
    return Needs{plan.device_bytes, plan.host_bytes};
  };
  double gpu = 100.0, cpu = 0.0;
  FERRY_ASSIGN_OR_RETURN(Needs all, needs(100.0, 0.0));
  if (!Within(all.device, r.device_budget)) {
    // The most on the GPU that its budget leaves room for (device need grows with the share).
    FERRY_ASSIGN_OR_RETURN(const Needs none, needs(0.0, 100.0));
    if (!Within(none.device, r.device_budget)) {
      return absl::ResourceExhaustedError(absl::StrCat("needs ", MiB(none.device), " MiB of GPU memory with every weight streamed; the budget is ",
                                                       MiB(r.device_budget), " MiB"));
    }
    double lo = 0.0, hi = 100.0;
    for (int i = 0; i < 40; ++i) {
      const double mid = (lo + hi) / 2;
      FERRY_ASSIGN_OR_RETURN(const Needs n, needs(mid, 100.0 - mid));
      (Within(n.device, r.device_budget) ? lo : hi) = mid;
    }
    gpu = Down(lo);
    // Then as much in pinned CPU memory as its budget allows; the rest on disk.
    cpu = 100.0 - gpu;
    FERRY_ASSIGN_OR_RETURN(const Needs n, needs(gpu, cpu));
    if (!Within(n.host, r.host_budget)) {
      if (!r.allow_disk) {
        return absl::ResourceExhaustedError(absl::StrCat("needs ", MiB(n.host), " MiB of pinned memory without a disk tier; the budget is ",
                                                         MiB(r.host_budget), " MiB"));
      }
      double clo = 0.0, chi = cpu;
      FERRY_ASSIGN_OR_RETURN(const Needs least, needs(gpu, 0.0));
      if (!Within(least.host, r.host_budget)) {
        return absl::ResourceExhaustedError(absl::StrCat("needs ", MiB(least.host), " MiB of pinned memory with the streamed weights on disk; the budget is ",
                                                         MiB(r.host_budget), " MiB"));
      }
      for (int i = 0; i < 40; ++i) {
        const double mid = (clo + chi) / 2;
        FERRY_ASSIGN_OR_RETURN(const Needs m, needs(gpu, mid));
        (Within(m.host, r.host_budget) ? clo : chi) = mid;
      }
      cpu = Down(clo);
    }
  }
  p.split = {gpu, cpu, 0.0};
  p.split.disk = std::max(0.0, 100.0 - gpu - cpu);
  if (p.split.disk < 5e-5) p.split = {gpu, 100.0 - gpu, 0.0};
  // The real check: the plan the run makes, with its budgets.
  FERRY_ASSIGN_OR_RETURN(offload::Plan plan, Model::PlanOffload(layout, OffloadOf(r, p, r.device_budget, r.host_budget), backend));
  Candidate c;
  if (model != nullptr) {
    FERRY_ASSIGN_OR_RETURN(c.prediction, model->Predict(r.config, layout, p, r.workload, plan, r.uring));
  }
  c.policy = p;
  c.plan = std::move(plan);
  return c;
}

absl::StatusOr<std::vector<Candidate>> SearchPolicies(const PlanRequest& request, const CostModel& model, const kernels::Backend& backend) {
  PlanRequest r = request;
  r.allow_disk = r.allow_disk && model.has_disk();  // no disk rates: no disk tier
  if (r.layouts.empty()) return absl::InvalidArgumentError("SearchPolicies: no weight layout");
  if (r.workload.prompt_len + r.workload.gen_len > r.config.max_positions) {
    return absl::InvalidArgumentError(absl::StrCat("prompt-len + gen-len = ", r.workload.prompt_len + r.workload.gen_len,
                                                   " exceeds the model's context of ", r.config.max_positions));
  }
  std::vector<Candidate> out;
  std::set<std::string> seen;
  absl::Status last = absl::ResourceExhaustedError("no policy was tried");
  const int64_t prompts = r.workload.num_prompts;
  const int max_batch = static_cast<int>(std::min<int64_t>(r.max_batch, prompts > 0 ? prompts : r.max_batch));
  std::vector<int> ngbs = {1, 2, 4, 8, 16};
  if (r.fixed_num_gpu_batches > 0) ngbs = {r.fixed_num_gpu_batches};
  std::vector<bool> places = {false};
  if (r.fix_kv_placement) {
    places = {r.fixed_kv_on_cpu};
  } else if (r.allow.kv_cpu) {
    places = {false, true};
  }
  std::vector<std::optional<offload::H2OOptions>> h2os = {std::nullopt};
  if (r.allow.h2o > 0) {
    const int max_len = r.workload.prompt_len + r.workload.gen_len;
    const int half = std::max(1, static_cast<int>(std::lround(r.allow.h2o * max_len / 2)));
    h2os.push_back(offload::H2OOptions{half, half, 0});
  }
  // Deja Vu where allowed and the FFN is ReLU's (an up matrix and no gate).
  std::vector<double> sparsities = {0.0};
  if (r.allow.sparsity > 0) {
    bool up = false, gate = false;
    for (const io::PlannedTensor& t : r.layouts.front().second.layer_matrices) {
      up = up || t.role == offload::RoleName(offload::Role::kUp);
      gate = gate || t.role == offload::RoleName(offload::Role::kGate);
    }
    if (!up || gate || r.config.ffn != FfnKind::kRelu) {
      return absl::InvalidArgumentError("--allow sparse: Deja Vu sparsity needs a ReLU FFN; this model's is SwiGLU");
    }
    sparsities.push_back(r.allow.sparsity);
  }
  for (size_t li = 0; li < r.layouts.size(); ++li) {
    const auto& [format, layout] = r.layouts[li];
    for (bool kv_cpu : places) {
      for (const KvType& kv : r.allow.kv_dtypes) {
        for (const auto& h2o : h2os) {
          for (const double sparsity : sparsities) {
            for (int ngb : ngbs) {
              std::vector<int> sizes;
              if (r.fixed_gpu_batch_size > 0) {
                sizes = {r.fixed_gpu_batch_size};
              } else {
                for (int g = 1; g * ngb <= max_batch; g *= 2) sizes.push_back(g);
                if (prompts > 0 && prompts % ngb == 0 && prompts / ngb <= max_batch) sizes.push_back(static_cast<int>(prompts / ngb));
              }
              for (int gbs : sizes) {
                Policy p;
                p.gpu_batch_size = gbs;
                p.num_gpu_batches = ngb;
                p.kv_on_cpu = kv_cpu;
                p.kv_dtype = kv;
                p.h2o = h2o;
                p.weights = format;
                p.sparsity = sparsity;
                auto c = PlaceWeights(r, layout, p, &model, backend);
                if (!c.ok()) {
                  last = c.status();
                  if (absl::IsResourceExhausted(c.status())) break;  // larger batches need more
                  return c.status();
                }
                c->runnable = li < r.runnable_layouts;
                const std::string key = c->policy.Flags();
                if (seen.insert(key).second) out.push_back(*std::move(c));
              }
            }
          }
        }
      }
    }
  }
  if (out.empty()) {
    return absl::ResourceExhaustedError(absl::StrCat("no policy fits: the smallest (one sequence) ", last.message(),
                                                     "; give more memory (--gpu-mem, --cpu-mem) or allow approximations (--allow)"));
  }
  // Fastest first; of equally fast plans, the one that needs less GPU memory.
  std::stable_sort(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) {
    if (a.prediction.throughput_tok_s != b.prediction.throughput_tok_s) return a.prediction.throughput_tok_s > b.prediction.throughput_tok_s;
    return a.plan.device_bytes < b.plan.device_bytes;
  });
  return out;
}

absl::StatusOr<FormatLayouts> LayoutsOfStore(const io::Store& store, const Allowance& allow) {
  FormatLayouts out;
  FERRY_ASSIGN_OR_RETURN(WeightLayout own, LayoutOf(store));
  const std::optional<QuantFormat> format = own.quant;
  out.emplace_back(format, std::move(own));
  if (format) return out;  // a quantized store runs as it is
  for (const QuantFormat& f : allow.weights) {
    FERRY_ASSIGN_OR_RETURN(const io::StoreLayout l, io::LayoutStore(PlannedTensorsOf(store, f)));
    out.emplace_back(f, LayoutOf(l));
  }
  return out;
}

absl::StatusOr<FormatLayouts> LayoutsOfDummy(const std::string& dummy, const Allowance& allow) {
  FERRY_ASSIGN_OR_RETURN(const DummyShape shape, FindDummyShape(dummy));
  FormatLayouts out;
  std::vector<std::optional<QuantFormat>> formats = {std::nullopt};
  for (const QuantFormat& f : allow.weights) formats.push_back(f);
  for (const auto& f : formats) {
    FERRY_ASSIGN_OR_RETURN(std::vector<io::PlannedTensor> planned, DummyPlannedTensors(shape, f));
    FERRY_ASSIGN_OR_RETURN(const io::StoreLayout l, io::LayoutStore(std::move(planned)));
    out.emplace_back(f, LayoutOf(l));
  }
  return out;
}

absl::StatusOr<FormatLayouts> LayoutsOfCheckpoint(const std::string& model_dir, const Allowance& allow, ModelConfig* config) {
  FormatLayouts out;
  std::vector<std::optional<QuantFormat>> formats = {std::nullopt};
  for (const QuantFormat& f : allow.weights) formats.push_back(f);
  for (const auto& f : formats) {
    GgufLoadOptions g;
    g.quantize = f;
    FERRY_ASSIGN_OR_RETURN(auto planned, PlanConvertedTensors(model_dir, g));
    *config = planned.first;
    FERRY_ASSIGN_OR_RETURN(const io::StoreLayout l, io::LayoutStore(std::move(planned.second)));
    WeightLayout w = LayoutOf(l);
    out.emplace_back(f ? f : w.quant, std::move(w));
  }
  return out;
}

std::string PlanTable(const std::vector<Candidate>& cs, size_t top) {
  std::string s = absl::StrFormat("%-3s %10s %9s %9s %-15s %9s %9s  %s\n", "#", "tok/s", "prefill", "step", "bound", "GPU MiB", "CPU MiB",
                                  "policy");
  for (size_t i = 0; i < cs.size() && i < top; ++i) {
    const Candidate& c = cs[i];
    const Prediction& p = c.prediction;
    absl::StrAppend(&s, absl::StrFormat("%-3d %10.2f %8.3fs %8.4fs %-15s %9s %9s  %s%s\n", static_cast<int>(i + 1), p.throughput_tok_s,
                                        p.prefill_s, p.step_s, p.bound, MiB(p.device_bytes), MiB(p.host_bytes), c.policy.Flags(),
                                        c.runnable ? "" : "  (convert the store first)"));
  }
  return s;
}

}  // namespace ferry::engine
