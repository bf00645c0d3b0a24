// `ferry probe` (this machine measured once and cached) and `ferry plan` (the fastest policy
// that fits the given memory for a model and workload, by the cost model over that probe).
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/file.h"
#include "base/status.h"
#include "engine/cli/commands.h"
#include "engine/dummy_model.h"
#include "engine/gguf_model.h"
#include "engine/planner.h"
#include "engine/probe.h"
#include "io/store.h"
#include "kernels/registry.h"

namespace ferry::cli {

std::string ProbeDirFor(const std::string& store_dir) {
  std::string d = store_dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const size_t slash = d.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : d.substr(0, slash);
}

absl::StatusOr<PlanSetup> SetUpPlan(const PlanInputFlags& f, kernels::Backend& backend, bool quiet) {
  PlanSetup s;
  const bool dummy_store = !f.dummy.empty() && (f.store.empty() || !PathExists(f.store + "/manifest.json"));
  std::string where;
  if (dummy_store) {
    FERRY_ASSIGN_OR_RETURN(const engine::DummyShape shape, engine::FindDummyShape(f.dummy));
    FERRY_ASSIGN_OR_RETURN(s.request.config, engine::ModelConfig::FromJson(engine::DummyConfigJson(shape), shape.name));
    FERRY_ASSIGN_OR_RETURN(s.request.allow, engine::ParseAllowance(f.allow, s.request.config.head_dim(), f.quant_group));
    FERRY_ASSIGN_OR_RETURN(s.request.layouts, engine::LayoutsOfDummy(f.dummy, s.request.allow));
    s.request.runnable_layouts = s.request.layouts.size();
    where = f.store.empty() ? "." : ProbeDirFor(f.store);
    s.model_name = absl::StrCat("dummy ", f.dummy, " (not written yet)");
  } else {
    const std::string dir = !f.store.empty() && f.model.empty() ? f.store : f.model;
    if (dir.empty()) return absl::InvalidArgumentError("give --model STORE or --dummy NAME");
    if (!PathExists(dir + "/manifest.json")) {
      // A checkpoint or GGUF file: planned as `ferry convert` would write it (convert, then run).
      const bool gguf = engine::IsGgufFile(dir);
      if (!gguf && !PathExists(dir + "/config.json")) {
        return absl::InvalidArgumentError(absl::StrCat(dir, " is neither a ferry store, a checkpoint nor a GGUF file"));
      }
      if (gguf) {
        FERRY_ASSIGN_OR_RETURN(const engine::GgufModel g, engine::OpenGgufModel(dir));
        s.request.config = g.config;
      } else {
        FERRY_ASSIGN_OR_RETURN(s.request.config, engine::ModelConfig::FromModelDir(dir));
      }
      FERRY_ASSIGN_OR_RETURN(s.request.allow, engine::ParseAllowance(f.allow, s.request.config.head_dim(), f.quant_group));
      FERRY_ASSIGN_OR_RETURN(s.request.layouts, engine::LayoutsOfCheckpoint(dir, s.request.allow, &s.request.config));
      s.request.runnable_layouts = 0;
      where = ProbeDirFor(dir);
      s.model_name = absl::StrCat(dir, " (not converted yet)");
      s.needs_convert = true;
    } else {
      FERRY_ASSIGN_OR_RETURN(const io::Store store, io::Store::Open(dir));
      FERRY_ASSIGN_OR_RETURN(s.request.config, engine::ModelConfig::FromModelDir(dir));
      FERRY_ASSIGN_OR_RETURN(s.request.allow, engine::ParseAllowance(f.allow, s.request.config.head_dim(), f.quant_group));
      FERRY_ASSIGN_OR_RETURN(s.request.layouts, engine::LayoutsOfStore(store, s.request.allow));
      where = ProbeDirFor(dir);
      s.model_name = dir;
    }
  }
  s.request.workload = {f.prompt_len, f.gen_len, f.num_prompts};
  if (!f.gpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(s.request.device_budget, offload::ParseBytes(f.gpu_mem));
  }
  if (!f.cpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(s.request.host_budget, offload::ParseBytes(f.cpu_mem));
  }
  FERRY_ASSIGN_OR_RETURN(const uint64_t block, offload::ParseBytes(f.block_size));
  s.request.uring.queue_depth = f.queue_depth;
  s.request.uring.block_bytes = block;
  s.request.max_batch = f.max_batch;
  engine::ProbeOptions po;
  po.disk_dir = f.probe_dir.empty() ? where : f.probe_dir;
  if (!quiet) po.progress = [](const std::string& m) { std::fprintf(stderr, "ferry: probing %s\n", m.c_str()); };
  po.device_budget = s.request.device_budget;
  po.host_budget = s.request.host_budget;
  bool cached = false;
  FERRY_ASSIGN_OR_RETURN(s.probe, engine::LoadOrProbe(backend, po, f.reprobe, &cached));
  if (!quiet) {
    std::fprintf(stderr, "ferry: %s %s\n", cached ? "planning with the cached probe" : "probe written to",
                 engine::ProbeCachePath(backend).c_str());
  }
  FERRY_ASSIGN_OR_RETURN(s.model, engine::CostModel::FromProbe(s.probe));
  return s;
}

void AddPlanInputFlags(CLI::App* c, PlanInputFlags* f, bool with_model) {
  if (with_model) {
    auto* model = c->add_option("--model", f->model, "A ferry store");
    c->add_option("--dummy", f->dummy, "A dummy model (opt-125m ... llama-3-70b, qwen2.5-7b, mistral-7b)")->excludes(model);
    c->add_option("--store", f->store, "With --dummy: where its store is (or will be) written")->capture_default_str();
    c->add_option("--prompt-len", f->prompt_len, "Prompt tokens")->check(CLI::PositiveNumber)->capture_default_str();
    c->add_option("--gen-len", f->gen_len, "Generated tokens")->check(CLI::PositiveNumber)->capture_default_str();
    c->add_option("--gpu-mem", f->gpu_mem, "Device memory budget, e.g. 24GiB (default: none)");
    c->add_option("--cpu-mem", f->cpu_mem, "Pinned host memory budget, e.g. 64GiB (default: none)");
    c->add_option("--device", f->device, "Backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
    c->add_option("--queue-depth", f->queue_depth, "io_uring queue depth for disk reads")->check(CLI::Range(1, 4096))->capture_default_str();
    c->add_option("--block-size", f->block_size, "io_uring request size (multiple of 4 KiB)")->capture_default_str();
    c->add_option("--quant-group", f->quant_group, "Values per quantization group (q4, q8 in --allow)")->capture_default_str();
  }
  c->add_option("--num-prompts", f->num_prompts, "Prompts in the workload (0: one batch; more: batches of the plan's size)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c->add_option("--allow", f->allow,
                "Approximations the plan may use: exact, or any of q4, q8 (weights), kv-f16, kv-q8, kv-q4, h2o=FRACTION")
      ->capture_default_str();
  c->add_option("--max-batch", f->max_batch, "Sequences in one batch at most")->check(CLI::PositiveNumber)->capture_default_str();
  c->add_option("--probe-dir", f->probe_dir, "Where the disk probe reads (default: the store's filesystem)");
  c->add_flag("--reprobe", f->reprobe, "Measure the machine again instead of the cached probe");
}

namespace {

struct ProbeFlags {
  std::string device = "cpu";
  std::string dir;
  std::string gpu_mem;
  bool reprobe = false, json = false, quick = false, quiet = false;
};

absl::Status RunProbeCommand(const ProbeFlags& f) {
  kernels::BackendOptions bo;
  bo.name = f.device;
  if (!f.gpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(bo.memory_budget_bytes, offload::ParseBytes(f.gpu_mem));
  }
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(bo));
  engine::ProbeOptions o;
  o.disk_dir = f.dir;
  if (f.quick) {  // a smoke run (seconds): small shapes, short repetitions
    o.copy_chunks = {1 << 20};
    o.disk_blocks = {1 << 20};
    o.disk_depths = {1, 16};
    o.disk_file_bytes = 16 << 20;
    o.gemm_rows = {1, 16};
    o.gemm_sizes = {512};
    o.linear_rotate_bytes = 8 << 20;
    o.attention_len = 128;
    o.attention_rows = 2;
    o.prefill_attention_len = 64;
    o.min_seconds = 0.01;
    o.repetitions = 1;
    o.quick = true;
  }
  if (!f.quiet) o.progress = [](const std::string& s) { std::fprintf(stderr, "ferry: probing %s\n", s.c_str()); };
  bool cached = false;
  FERRY_ASSIGN_OR_RETURN(const nlohmann::json j, engine::LoadOrProbe(*backend, o, f.reprobe, &cached));
  if (f.json) {
    std::printf("%s\n", j.dump(1).c_str());
  } else {
    std::fputs(engine::ProbeTable(j).c_str(), stdout);
  }
  if (!f.quiet) {
    std::fprintf(stderr, "ferry: %s %s\n", cached ? "cached probe (--reprobe measures again):" : "probe written to",
                 engine::ProbeCachePath(*backend).c_str());
  }
  return absl::OkStatus();
}

struct PlanFlags {
  PlanInputFlags in;
  int top = 5;
  bool json = false, quiet = false;
};

absl::Status RunPlan(const PlanFlags& f) {
  kernels::BackendOptions bo;
  bo.name = f.in.device;
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(bo));
  FERRY_ASSIGN_OR_RETURN(PlanSetup s, SetUpPlan(f.in, *backend, f.quiet));
  FERRY_ASSIGN_OR_RETURN(const std::vector<engine::Candidate> cs, engine::SearchPolicies(s.request, s.model, *backend));
  const auto& r = s.request;
  if (f.json) {
    nlohmann::json j = {{"model", s.model_name}, {"device", backend->name()},
                        {"workload", {{"prompt_len", r.workload.prompt_len}, {"gen_len", r.workload.gen_len}, {"num_prompts", r.workload.num_prompts}}},
                        {"budgets", {{"gpu", r.device_budget}, {"cpu", r.host_budget}}}, {"allow", r.allow.Describe()},
                        {"candidates_considered", cs.size()}, {"plans", nlohmann::json::array()}};
    for (size_t i = 0; i < cs.size() && i < static_cast<size_t>(f.top); ++i) {
      j["plans"].push_back({{"flags", cs[i].policy.Flags()}, {"runnable", cs[i].runnable}, {"predicted", cs[i].prediction.ToJson()}});
    }
    std::printf("%s\n", j.dump(1).c_str());
    return absl::OkStatus();
  }
  std::printf("model %s (%s, %d layers), device %s\n", s.model_name.c_str(), r.config.model_type.c_str(), r.config.num_layers,
              backend->name().c_str());
  std::printf("workload %d + %d tokens, %s; budgets GPU %s, CPU %s; allowed: %s\n", r.workload.prompt_len, r.workload.gen_len,
              r.workload.num_prompts > 0 ? absl::StrCat(r.workload.num_prompts, " prompts").c_str() : "one batch",
              r.device_budget > 0 ? absl::StrFormat("%.0f MiB", r.device_budget / 1048576.0).c_str() : "none",
              r.host_budget > 0 ? absl::StrFormat("%.0f MiB", r.host_budget / 1048576.0).c_str() : "none", r.allow.Describe().c_str());
  std::printf("%zu policies fit; the best %d by predicted throughput:\n", cs.size(), std::min<int>(f.top, static_cast<int>(cs.size())));
  std::fputs(engine::PlanTable(cs, static_cast<size_t>(f.top)).c_str(), stdout);
  const engine::Candidate& best = cs.front();
  if (s.needs_convert) {
    std::printf("convert first: ferry convert --model %s --out STORE%s, then bench or generate with --model STORE\n", f.in.model.c_str(),
                best.policy.weights ? absl::StrCat(" --quantize ", QuantFormatName(*best.policy.weights).substr(0, 2)).c_str() : "");
  }
  std::printf("run it: ferry bench %s %s --prompt-len %d --gen-len %d%s%s\n",
              f.in.dummy.empty() ? absl::StrCat("--model ", s.needs_convert ? std::string("STORE") : s.model_name).c_str() : absl::StrCat("--dummy ", f.in.dummy, " --store ", f.in.store.empty() ? "STORE" : f.in.store).c_str(),
              absl::StrCat(best.policy.Flags(!f.in.dummy.empty()),
                           best.policy.sparsity > 0 && f.in.dummy.empty() ? " --sparsity PREDICTORS (ferry sparsity train)" : "")
                  .c_str(),
              r.workload.prompt_len, r.workload.gen_len,
              r.device_budget > 0 ? absl::StrCat(" --gpu-mem ", f.in.gpu_mem).c_str() : "",
              r.host_budget > 0 ? absl::StrCat(" --cpu-mem ", f.in.cpu_mem).c_str() : "");
  return absl::OkStatus();
}

}  // namespace

void RegisterPlanCommand(CLI::App& app, Runner* selected) {
  static ProbeFlags probef;
  CLI::App* pr = app.add_subcommand("probe", "Measure this machine's copy, disk, GEMM and attention rates once and cache them (JSON)");
  pr->add_option("--device", probef.device, "Backend to probe")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  pr->add_option("--dir", probef.dir, "Probe O_DIRECT reads on this directory's filesystem (where the store lives); none if unset");
  pr->add_option("--gpu-mem", probef.gpu_mem, "Device memory budget for the probe's buffers");
  pr->add_flag("--reprobe", probef.reprobe, "Measure again even if a cached probe exists");
  pr->add_flag("--quick", probef.quick, "Small shapes and short repetitions (a smoke run, not for planning)");
  pr->add_flag("--json", probef.json, "Print the probe as JSON");
  pr->add_flag("--quiet,-q", probef.quiet, "No progress on stderr");
  pr->callback([selected] { *selected = [] { return RunProbeCommand(probef); }; });
  static PlanFlags f;
  CLI::App* c = app.add_subcommand("plan", "Choose the fastest offloading policy that fits, by the cost model over this machine's probe");
  AddPlanInputFlags(c, &f.in, /*with_model=*/true);
  c->add_option("--top", f.top, "Plans to list")->check(CLI::PositiveNumber)->capture_default_str();
  c->add_flag("--json", f.json, "Print the plans as JSON");
  c->add_flag("--quiet,-q", f.quiet, "No progress on stderr");
  c->callback([selected] { *selected = [] { return RunPlan(f); }; });
}

}  // namespace ferry::cli
