// `ferry bench`: FlexGen-style throughput benchmark on a real or dummy model through the
// offloading executor.
#include <cstdio>
#include <fstream>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/file.h"
#include "base/status.h"
#include "engine/bench.h"
#include "engine/cli/commands.h"
#include "engine/dummy_model.h"
#include "engine/model.h"
#include "engine/probe.h"
#include "kernels/registry.h"
#include "io/store.h"
#include "nlohmann/json.hpp"

namespace ferry::cli {
namespace {

struct BenchFlags {
  // The model, workload, budgets, device, I/O and planning flags (shared with --policy auto's planner).
  PlanInputFlags in;
  std::string weights = "100,0,0", kv = "gpu", kv_dtype = "f32", json;
  int gpu_batch_size = 1, num_gpu_batches = 1;
  uint64_t seed = 1;
  bool quiet = false;
  std::string h2o;
  bool fit_batch = false;
  double sparsity_sim = 0.0, sparsity_k = 0.15, sparsity_dense_above = 0.9, sparsity_cache = 0.0;
  std::string sparsity;
  std::string quantize;
  std::string policy = "manual";
  bool predict = false;
  std::vector<std::string> sweep;  // KEY=V1:V2:...
  std::string jsonl;
};

// --policy auto: the planner's best runnable policy for this store (or dummy, written in the
// chosen format) within the budgets; sets the flags it chose and says which.
absl::Status ChoosePolicy(BenchFlags& f, kernels::Backend& backend, engine::BenchOptions& o) {
  PlanInputFlags in = f.in;
  if (in.model.empty() && in.dummy.empty()) in.model = DefaultModelDir();
  if (!in.store.empty() && PathExists(in.store + "/manifest.json")) in.model = in.store, in.dummy.clear();  // its format is fixed
  if (!f.quantize.empty()) return absl::InvalidArgumentError("--policy auto chooses the weights' format: give --allow q4 instead of --quantize");
  FERRY_ASSIGN_OR_RETURN(PlanSetup s, SetUpPlan(in, backend, f.quiet));
  if (s.request.allow.sparsity > 0 && f.in.dummy.empty() && f.sparsity.empty()) {
    return absl::InvalidArgumentError(
        "--allow sparse=K runs Deja Vu with trained predictors: give --sparsity DIR (from ferry sparsity train), or bench a --dummy");
  }
  if (!f.sparsity.empty() && !(s.request.allow.sparsity > 0)) {
    return absl::InvalidArgumentError("--policy auto with --sparsity DIR: allow it with --allow sparse=K (the fraction of neurons kept)");
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<engine::Candidate> cs, engine::SearchPolicies(s.request, s.model, backend));
  const engine::Candidate* best = nullptr;
  for (const auto& c : cs) {
    if (c.runnable) {
      best = &c;
      break;
    }
  }
  if (best == nullptr) return absl::ResourceExhaustedError("no runnable policy fits (the ones that do need the store converted)");
  const engine::Policy& p = best->policy;
  o.policy = p;
  // Deja Vu: a dummy draws random neuron sets of the chosen density; a store keeps the top k of
  // the trained predictors (--sparsity DIR, which sparse=K needs).
  o.sparsity_sim = 0.0;
  if (p.sparsity > 0 && !f.in.dummy.empty()) {
    o.sparsity_sim = p.sparsity;
    o.sparsity_dir.clear();
  } else if (p.sparsity > 0) {
    o.sparsity_k = p.sparsity;
  } else {
    o.sparsity_dir.clear();
  }
  if (p.weights) f.quantize = QuantFormatName(*p.weights).substr(0, 2), f.in.quant_group = p.weights->group;
  o.probe = s.probe;
  o.policy_source = "auto";
  if (!f.quiet) {
    std::fprintf(stderr, "ferry: policy auto: %s (predicted %.2f tok/s, step %.4f s, bound by %s; %zu policies fit)\n",
                 p.Flags(!f.in.dummy.empty()).c_str(), best->prediction.throughput_tok_s, best->prediction.step_s, best->prediction.bound.c_str(), cs.size());
    if (best != &cs.front()) {
      std::fprintf(stderr, "ferry: a converted store would be faster: %s (predicted %.2f tok/s)\n", cs.front().policy.Flags().c_str(),
                   cs.front().prediction.throughput_tok_s);
    }
  }
  return absl::OkStatus();
}

// The quantized format of a store's layer matrices (nullopt: float).
absl::StatusOr<std::optional<QuantFormat>> StoreQuant(const std::string& dir) {
  FERRY_ASSIGN_OR_RETURN(io::Store store, io::Store::Open(dir));
  for (const io::StoreTensor* t : store.LayerTensors(0)) {
    if (t->info.quant) return t->info.quant;
  }
  return std::optional<QuantFormat>();
}

// A store reused by --store must hold the weights --quantize asks for.
absl::Status CheckStoreQuant(const std::string& dir, const std::optional<QuantFormat>& want) {
  FERRY_ASSIGN_OR_RETURN(const std::optional<QuantFormat> have, StoreQuant(dir));
  if (have == want) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(dir, " holds ", have ? QuantFormatName(*have) : "float", " layer matrices but --quantize asks for ",
                                                 want ? QuantFormatName(*want) : "none", ": give another --store"));
}

// Makes sure flags.store (or the model itself) is a store; returns its directory.
absl::StatusOr<std::string> PrepareStore(const BenchFlags& f) {
  std::optional<QuantFormat> quant;
  if (!f.quantize.empty()) {
    FERRY_ASSIGN_OR_RETURN(quant, MakeQuantFormat(f.quantize, f.in.quant_group));
  }
  auto progress = [&](const char* what) -> std::function<void(uint64_t, uint64_t)> {
    if (f.quiet) return nullptr;
    return [what](uint64_t done, uint64_t total) {
      if (done == total || done % (256ull << 20) < (64ull << 20)) {
        std::fprintf(stderr, "\rferry: %s %.0f/%.0f MiB", what, done / 1048576.0, total / 1048576.0);
        if (done == total) std::fputc('\n', stderr);
      }
    };
  };
  if (!f.in.dummy.empty()) {
    FERRY_ASSIGN_OR_RETURN(engine::DummyShape shape, engine::FindDummyShape(f.in.dummy));
    if (f.in.store.empty()) return absl::InvalidArgumentError("--dummy needs --store DIR (the store is created there once)");
    if (PathExists(f.in.store + "/manifest.json")) {
      FERRY_ASSIGN_OR_RETURN(std::string cfg, ReadFileToString(f.in.store + "/config.json"));
      auto j = nlohmann::json::parse(cfg, nullptr, false);
      if (j.is_discarded() || j.value("_ferry_dummy", std::string()) != f.in.dummy) {
        return absl::InvalidArgumentError(absl::StrCat(f.in.store, " holds another model than dummy ", f.in.dummy));
      }
      FERRY_RETURN_IF_ERROR(CheckStoreQuant(f.in.store, quant));
      return f.in.store;
    }
    if (!f.quiet) {
      std::fprintf(stderr, "ferry: writing dummy %s (%.1f GiB of fp16 weights%s) to %s\n", f.in.dummy.c_str(),
                   engine::DummyWeightBytes(shape) / 1073741824.0, quant ? ", layer matrices quantized" : "", f.in.store.c_str());
    }
    engine::DummyStoreOptions o;
    o.quantize = quant;
    o.progress = progress("dummy weights");
    FERRY_RETURN_IF_ERROR(engine::WriteDummyStore(shape, f.in.store, o));
    return f.in.store;
  }
  const std::string model = f.in.model.empty() ? DefaultModelDir() : f.in.model;
  if (PathExists(model + "/manifest.json")) {
    FERRY_RETURN_IF_ERROR(CheckStoreQuant(model, quant));
    return model;
  }
  if (f.in.store.empty()) return absl::InvalidArgumentError("--model is a Hugging Face checkpoint: give --store DIR to convert it into");
  if (!PathExists(f.in.store + "/manifest.json")) {
    io::ConvertOptions o;
    o.progress = progress("convert");
    engine::GgufLoadOptions go;
    go.quantize = quant;
    FERRY_RETURN_IF_ERROR(engine::ConvertModel(model, f.in.store, o, go));
  }
  FERRY_RETURN_IF_ERROR(CheckStoreQuant(f.in.store, quant));
  return f.in.store;
}

absl::Status RunOneBench(BenchFlags f) {
  engine::BenchOptions o;
  o.policy.kv_on_cpu = f.kv == "cpu";
  // f32 / f16 now; q8 / q4 once the store's head_dim is known (below).
  FERRY_ASSIGN_OR_RETURN(o.policy.split, offload::ParseWeightSplit(f.weights));
  if (!f.in.gpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(o.backend.memory_budget_bytes, offload::ParseBytes(f.in.gpu_mem));
  }
  if (!f.in.cpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(o.backend.host_budget_bytes, offload::ParseBytes(f.in.cpu_mem));
  }
  FERRY_ASSIGN_OR_RETURN(const uint64_t block, offload::ParseBytes(f.in.block_size));
  o.backend.name = f.in.device;
  o.prompt_len = f.in.prompt_len;
  o.gen_len = f.in.gen_len;
  o.policy.gpu_batch_size = f.gpu_batch_size;
  o.policy.num_gpu_batches = f.num_gpu_batches;
  o.uring.queue_depth = f.in.queue_depth;
  o.uring.block_bytes = block;
  o.seed = f.seed;
  o.fit_batch = f.fit_batch;
  o.sparsity_sim = f.sparsity_sim;
  o.sparsity_dir = f.sparsity;
  o.sparsity_k = f.sparsity_k;
  o.sparsity_dense_above = f.sparsity_dense_above;
  o.sparsity_cache = f.sparsity_cache;
  FERRY_ASSIGN_OR_RETURN(o.policy.h2o, ParseH2O(f.h2o, 0, 0));
  if (!f.quiet) o.progress = [](const std::string& s) { std::fprintf(stderr, "ferry: %s\n", s.c_str()); };
  const bool auto_policy = f.policy == "auto";
  if (auto_policy) {
    if (f.fit_batch) return absl::InvalidArgumentError("--policy auto chooses the batch: leave out --fit-batch");
    if (f.sparsity_sim > 0.0) return absl::InvalidArgumentError("--policy auto chooses the sparsity: give --allow sparse=K instead of --sparsity-sim");
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(o.backend));
    if (f.in.dummy.empty()) {  // a checkpoint is converted first (the policy does not change the store)
      FERRY_ASSIGN_OR_RETURN(f.in.store, PrepareStore(f));
    }
    FERRY_RETURN_IF_ERROR(ChoosePolicy(f, *backend, o));
  }
  FERRY_ASSIGN_OR_RETURN(o.store_dir, PrepareStore(f));
  if (!auto_policy) {
    FERRY_ASSIGN_OR_RETURN(const engine::ModelConfig config, engine::ModelConfig::FromModelDir(o.store_dir));
    FERRY_ASSIGN_OR_RETURN(o.policy.kv_dtype, ParseKvType(f.kv_dtype, config.head_dim()));
  }
  if (f.predict && !o.probe) {
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(o.backend));
    engine::ProbeOptions po;
    po.disk_dir = f.in.probe_dir.empty() ? ProbeDirFor(o.store_dir) : f.in.probe_dir;
    if (!f.quiet) po.progress = [](const std::string& m) { std::fprintf(stderr, "ferry: probing %s\n", m.c_str()); };
    po.device_budget = o.backend.memory_budget_bytes;
    po.host_budget = o.backend.host_budget_bytes;
    FERRY_ASSIGN_OR_RETURN(o.probe, engine::LoadOrProbe(*backend, po, f.in.reprobe));
  }
  FERRY_ASSIGN_OR_RETURN(engine::BenchResult r, engine::RunBench(o));
  std::fputs(r.Table().c_str(), stdout);
  if (!f.json.empty()) {
    std::ofstream out(f.json);
    out << r.json.dump(1) << "\n";
    out.close();
    if (!out) return absl::DataLossError(absl::StrCat("cannot write ", f.json));
  }
  if (!f.jsonl.empty()) {
    FERRY_ASSIGN_OR_RETURN(RecordFile out, RecordFile::Open(f.jsonl));
    FERRY_RETURN_IF_ERROR(out.Append(r.json.dump() + "\n"));
    FERRY_RETURN_IF_ERROR(out.Close());
  }
  return absl::OkStatus();
}

// --sweep KEY=V1:V2:... (several: their product): one run per setting, each appended to --jsonl.
absl::Status RunBenchCommand(const BenchFlags& f) {
  if (f.sweep.empty()) return RunOneBench(f);
  if (f.jsonl.empty()) return absl::InvalidArgumentError("--sweep writes one JSON line per run: give --jsonl FILE");
  if (f.policy == "auto") return absl::InvalidArgumentError("--sweep varies a hand policy: leave out --policy auto");
  std::vector<BenchFlags> runs = {f};
  for (const std::string& spec : f.sweep) {
    const size_t eq = spec.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 >= spec.size()) {
      return absl::InvalidArgumentError(absl::StrCat("--sweep wants KEY=V1:V2:..., got \"", spec, "\""));
    }
    const std::string key = spec.substr(0, eq);
    std::vector<std::string> values = absl::StrSplit(spec.substr(eq + 1), ':');
    std::vector<BenchFlags> next;
    for (const BenchFlags& base : runs) {
      for (const std::string& v : values) {
        BenchFlags g = base;
        int n = 0;
        if (key == "gpu-batch-size" || key == "num-gpu-batches") {
          if (!absl::SimpleAtoi(v, &n) || n < 1) return absl::InvalidArgumentError(absl::StrCat("--sweep ", key, ": \"", v, "\" is not a positive integer"));
          (key == "gpu-batch-size" ? g.gpu_batch_size : g.num_gpu_batches) = n;
        } else if (key == "weights") {
          FERRY_RETURN_IF_ERROR(offload::ParseWeightSplit(v).status());
          g.weights = v;
        } else if (key == "kv") {
          if (v != "gpu" && v != "cpu") return absl::InvalidArgumentError(absl::StrCat("--sweep kv: \"", v, "\" is not gpu or cpu"));
          g.kv = v;
        } else if (key == "kv-dtype") {
          if (v != "f32" && v != "f16" && v != "q8" && v != "q4") return absl::InvalidArgumentError(absl::StrCat("--sweep kv-dtype: \"", v, "\" is not f32, f16, q8 or q4"));
          g.kv_dtype = v;
        } else if (key == "h2o") {
          g.h2o = v == "none" ? "" : v;
          FERRY_RETURN_IF_ERROR(ParseH2O(g.h2o, 0, 0).status());
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat("--sweep: unknown key \"", key, "\" (gpu-batch-size, num-gpu-batches, weights, kv, kv-dtype, h2o)"));
        }
        next.push_back(std::move(g));
      }
    }
    runs = std::move(next);
  }
  for (size_t i = 0; i < runs.size(); ++i) {
    if (!f.quiet) std::fprintf(stderr, "ferry: sweep run %zu/%zu\n", i + 1, runs.size());
    FERRY_RETURN_IF_ERROR(RunOneBench(runs[i]));
  }
  return absl::OkStatus();
}

}  // namespace

void RegisterBenchCommand(CLI::App& app, Runner* selected) {
  static BenchFlags f;
  CLI::App* b = app.add_subcommand("bench", "Throughput benchmark (FlexGen's metrics) through the offloading executor");
  auto* model = b->add_option("--model", f.in.model, "Hugging Face checkpoint or ferry store (default: the embedded model)");
  b->add_option("--dummy", f.in.dummy, "Dummy model with random weights: opt-125m, opt-1.3b, opt-6.7b, opt-13b, opt-30b, opt-66b, opt-175b")
      ->excludes(model);
  b->add_option("--store", f.in.store, "Store directory: created once (dummy or converted checkpoint), then reused");
  b->add_option("--prompt-len", f.in.prompt_len, "Prompt tokens")->check(CLI::PositiveNumber)->capture_default_str();
  b->add_option("--gen-len", f.in.gen_len, "Generated tokens")->check(CLI::PositiveNumber)->capture_default_str();
  b->add_option("--gpu-batch-size", f.gpu_batch_size, "Sequences per GPU batch")->check(CLI::PositiveNumber)->capture_default_str();
  b->add_option("--num-gpu-batches", f.num_gpu_batches, "GPU batches per block")->check(CLI::PositiveNumber)->capture_default_str();
  b->add_option("--weights", f.weights, "Percent of each layer's weight bytes on GPU,CPU,DISK")->capture_default_str();
  b->add_option("--kv", f.kv, "Where the KV cache lives")->check(CLI::IsMember({"gpu", "cpu"}))->capture_default_str();
  b->add_option("--kv-dtype", f.kv_dtype,
                "Keys and values in the KV cache: f32, f16 (half the bytes: about twice the batch), q8 or q4 (group-wise; "
                "CPU backend)")
      ->check(CLI::IsMember({"f32", "f16", "q8", "q4"}))
      ->capture_default_str();
  b->add_option("--quantize", f.quantize,
                "Layer matrices stored and streamed quantized: q4 or q8 (the dummy or converted store is written so; a reused "
                "store must match)")
      ->check(CLI::IsMember({"q4", "q8"}));
  b->add_option("--quant-group", f.in.quant_group, "Values per quantization group")->capture_default_str();
  b->add_option("--gpu-mem", f.in.gpu_mem, "Device memory budget, e.g. 24GiB (default: none)");
  b->add_option("--cpu-mem", f.in.cpu_mem, "Pinned host memory budget, e.g. 64GiB (default: none)");
  b->add_option("--device", f.in.device, "Backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  b->add_option("--queue-depth", f.in.queue_depth, "io_uring queue depth for disk reads")->check(CLI::Range(1, 4096))->capture_default_str();
  b->add_option("--block-size", f.in.block_size, "io_uring request size (multiple of 4 KiB)")->capture_default_str();
  b->add_option("--seed", f.seed, "Seed of the random prompts")->capture_default_str();
  b->add_option("--h2o", f.h2o, "H2O KV eviction with HEAVY,RECENT slots per head (default: the full cache)");
  b->add_flag("--fit-batch", f.fit_batch, "Run the largest gpu-batch-size that fits --gpu-mem, and say which");
  auto* sim = b->add_option("--sparsity-sim", f.sparsity_sim,
                            "Deja Vu I/O path with random neuron sets of this density per token (decode; FC1/FC2 cross the "
                            "link only for the batch's union)")
                  ->check(CLI::Range(0.0, 1.0));
  b->add_option("--sparsity", f.sparsity, "Deja Vu through the executor with the trained predictors in this directory")
      ->excludes(sim);
  b->add_option("--sparsity-k", f.sparsity_k, "With --sparsity: fraction of neurons kept per token")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  b->add_option("--sparsity-dense-above", f.sparsity_dense_above,
                "A layer whose union over its first decode calls reaches this fraction runs dense")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  b->add_option("--sparsity-cache", f.sparsity_cache,
                "Keep this fraction of each layer's FFN bundles on the GPU, most recently used first: hits skip the link")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  b->add_option("--json", f.json, "Also write the results as JSON to this file");
  b->add_option("--jsonl", f.jsonl, "Append the results as one JSON line to this file (every run of a --sweep)");
  b->add_option("--sweep", f.sweep,
                "Run once per value: KEY=V1:V2:... with KEY gpu-batch-size, num-gpu-batches, weights (G,C,D), kv, kv-dtype or "
                "h2o (H,R or none); several multiply");
  b->add_option("--policy", f.policy, "manual (the flags given) or auto (ferry plan's best runnable policy for the budgets)")
      ->check(CLI::IsMember({"manual", "auto"}))
      ->capture_default_str();
  b->add_flag("--predict", f.predict, "Also predict the run with the cost model (the cached probe; measured first if none)");
  AddPlanInputFlags(b, &f.in, /*with_model=*/false);
  b->add_flag("--quiet,-q", f.quiet, "No progress on stderr");
  b->callback([selected] { *selected = [] { return RunBenchCommand(f); }; });
}

}  // namespace ferry::cli
