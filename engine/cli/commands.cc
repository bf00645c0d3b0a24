#include "engine/cli/commands.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/file.h"
#include "base/thread_pool.h"
#include "base/status.h"
#include "engine/chat_template.h"
#include "engine/generator.h"
#include "engine/jobs.h"
#include "engine/model.h"
#include "engine/perplexity.h"
#include "engine/probe.h"
#include "engine/sparsity.h"
#include "engine/tokenizer.h"
#include "io/gguf.h"
#include "io/store.h"
#include "offload/policy.h"
#include "kernels/registry.h"
#include "nlohmann/json.hpp"

namespace ferry::cli {
namespace {

struct ModelFlags {
  std::string model = DefaultModelDir();
  std::string device = "cpu";
  int threads = 0;
  std::string weights;  // GPU,CPU,DISK percentages: offloaded execution from a store
  std::string gpu_mem, cpu_mem;
  std::string kv_dtype = "f32";
  std::string gguf_dtype = "f16";
  std::string quantize;  // q4 | q8: layer matrices quantized at load (resident models)
  int quant_group = 64;
  std::string policy;    // "auto": the planner places a store's weights; "manual"; "": auto when it does not fit resident
};

absl::StatusOr<DType> GgufDtype(const std::string& name) {
  if (name == "f32") return DType::kF32;
  if (name == "f16") return DType::kF16;
  if (name == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(absl::StrCat("--gguf-dtype must be f32, f16 or bf16, not \"", name, "\""));
}

void AddGgufDtypeFlag(CLI::App* cmd, std::string* dtype) {
  cmd->add_option("--gguf-dtype", *dtype, "A GGUF model's quantized tensors are dequantized at load to this dtype (f32 is exact)")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}))
      ->capture_default_str();
}

void AddModelFlags(CLI::App* cmd, ModelFlags* f) {
  cmd->add_option("--model", f->model, "Hugging Face model directory (config.json, safetensors, tokenizer.json), ferry store or GGUF file")
      ->capture_default_str();
  AddGgufDtypeFlag(cmd, &f->gguf_dtype);
  cmd->add_option("--device", f->device, "Backend to run on")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd->add_option("--threads", f->threads, "CPU threads (0: all cores)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--weights", f->weights,
                  "Offload: percent of each layer's weights on GPU,CPU,DISK, e.g. 0,50,50 (needs a store: ferry convert)");
  cmd->add_option("--gpu-mem", f->gpu_mem, "Device memory budget, e.g. 24GiB (default: none)");
  cmd->add_option("--cpu-mem", f->cpu_mem, "Pinned host memory budget for offloading, e.g. 64GiB (default: none)");
  cmd->add_option("--policy", f->policy,
                  "Weights placement of a store: auto (as much on the GPU as --gpu-mem leaves, then pinned CPU memory, then "
                  "disk; the default when the store does not fit --gpu-mem resident) or manual (--weights, or resident)")
      ->check(CLI::IsMember({"auto", "manual"}));
}

// Commands that run a resident model's forward pass can quantize its layer matrices at load.
void AddQuantizeFlags(CLI::App* cmd, ModelFlags* f) {
  cmd->add_option("--quantize", f->quantize,
                  "Quantize the layer matrices at load: q4 (asymmetric 4-bit, fp16 scale and minimum per group) or q8 "
                  "(symmetric 8-bit); the CPU backend dequantizes inside its linear kernel")
      ->check(CLI::IsMember({"q4", "q8"}));
  cmd->add_option("--quant-group", f->quant_group, "Values per quantization group along a matrix row")->capture_default_str();
}

void AddKvDtypeFlag(CLI::App* cmd, ModelFlags* f) {
  cmd->add_option("--kv-dtype", f->kv_dtype,
                  "Keys and values in the KV cache: f32, f16 (half the memory), q8 or q4 (group-wise along head_dim, "
                  "dequantized inside attention; CPU backend)")
      ->check(CLI::IsMember({"f32", "f16", "q8", "q4"}))
      ->capture_default_str();
}

absl::StatusOr<KvType> KvDtype(const ModelFlags& f, const engine::ModelConfig& c) { return ParseKvType(f.kv_dtype, c.head_dim()); }

struct Loaded {
  bool offloaded = false;  // --weights, or --policy auto placed the store's weights
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<engine::Tokenizer> tokenizer;
};

absl::Status CheckModelDir(const std::string& dir) {
  if (!PathExists(dir)) return absl::NotFoundError(absl::StrCat("model directory ", dir, " does not exist"));
  if (engine::IsGgufFile(dir)) return absl::OkStatus();
  if (!PathExists(dir + "/config.json")) return absl::NotFoundError(absl::StrCat("no config.json in ", dir));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<engine::Tokenizer>> LoadTokenizer(const ModelFlags& f) {
  FERRY_RETURN_IF_ERROR(CheckModelDir(f.model));
  return engine::Tokenizer::FromModelDir(f.model);
}

// `rows` and `max_tokens_per_call`: the largest batch and forward call the command will run,
// reserved in the memory plan of an offloaded model.
// `sparse_ffn`: Deja Vu through the executor (needs --weights), with `sparse_cache` of each FFN's
// bundles cached on the device. `whole_prefill`: an offloaded model's prefill runs every prompt
// of a batch in one call (rows x the context), in micro-batches of max_tokens_per_call (when
// offloaded: by --weights, or by --policy auto, which is the default for a store that does not fit
// --gpu-mem resident).
absl::StatusOr<Loaded> LoadAll(const ModelFlags& f, int64_t rows, int64_t max_tokens_per_call, bool sparse_ffn = false,
                               double sparse_cache = 0.0, bool whole_prefill = false) {
  if (f.threads > ThreadPool::kMaxThreads) {
    return absl::InvalidArgumentError(absl::StrCat("--threads ", f.threads, " is more than ", ThreadPool::kMaxThreads));
  }
  if (f.threads > 0) setenv("FERRY_NUM_THREADS", std::to_string(f.threads).c_str(), 1);
  if (!f.cpu_mem.empty() && f.weights.empty() && (f.policy == "manual" || !PathExists(f.model + "/manifest.json"))) {
    return absl::InvalidArgumentError("--cpu-mem budgets the pinned memory of offloading; it needs --weights or --policy auto (a store)");
  }
  FERRY_RETURN_IF_ERROR(CheckModelDir(f.model));
  Loaded l;
  kernels::BackendOptions bo;
  bo.name = f.device;
  if (!f.gpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(bo.memory_budget_bytes, offload::ParseBytes(f.gpu_mem));
  }
  if (!f.cpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(bo.host_budget_bytes, offload::ParseBytes(f.cpu_mem));
  }
  FERRY_ASSIGN_OR_RETURN(l.backend, kernels::CreateBackend(bo));
  FERRY_ASSIGN_OR_RETURN(l.tokenizer, engine::Tokenizer::FromModelDir(f.model));
  offload::WeightSplit split;
  if (!f.weights.empty()) {
    FERRY_ASSIGN_OR_RETURN(split, offload::ParseWeightSplit(f.weights));
  }
  if (f.policy == "auto" && !f.weights.empty()) return absl::InvalidArgumentError("--policy auto chooses --weights: give one or the other");
  if (f.policy == "auto" && !f.quantize.empty()) {
    return absl::InvalidArgumentError("--policy auto streams a store's bytes as they are; --quantize quantizes a resident model at load: "
                                      "convert with --quantize instead");
  }
  const bool is_store = PathExists(f.model + "/manifest.json");
  if (f.policy == "auto" && !is_store) {
    return absl::InvalidArgumentError(absl::StrCat("--policy auto places a ferry store's weights; convert first: ferry convert --model ",
                                                   f.model, " --out STORE"));
  }
  // The offloaded run's options for a split: the KV cache of `rows` sequences of the whole context
  // and the forward workspace, reserved in the plan.
  std::optional<engine::ModelConfig> config;
  if (is_store) {
    FERRY_ASSIGN_OR_RETURN(config, engine::ModelConfig::FromModelDir(f.model));
  }
  auto offload_of = [&](const offload::WeightSplit& s, uint64_t device_budget, uint64_t host_budget) -> absl::StatusOr<engine::OffloadOptions> {
    engine::OffloadOptions o;
    o.split = s;
    o.sparse_ffn = sparse_ffn;
    o.sparse_cache_fraction = sparse_cache;
    o.device_budget = device_budget;
    o.host_budget = host_budget;
    FERRY_ASSIGN_OR_RETURN(const KvType kv_type, KvDtype(f, *config));
    o.reserve_device_bytes = offload::KvCacheBytes(engine::KvSpec(*config, static_cast<int>(rows), config->max_positions, kv_type)).device +
                             engine::Model::ForwardWorkspaceBytes(*config, whole_prefill ? rows * config->max_positions : max_tokens_per_call, rows,
                                                                   max_tokens_per_call);
    return o;
  };
  bool offloaded = !f.weights.empty();
  if (is_store && f.weights.empty() && f.policy != "manual" && f.quantize.empty() && !sparse_ffn) {
    FERRY_ASSIGN_OR_RETURN(const io::Store store, io::Store::Open(f.model));
    // Auto by default only when the weights alone exceed the budget: a resident run allocates its
    // cache and workspace for the prompts it gets, so anything less may still fit.
    engine::OffloadOptions resident;
    resident.device_budget = bo.memory_budget_bytes;
    const bool fits = engine::Model::PlanOffload(store, resident, *l.backend).ok();
    if (f.policy == "auto" || !fits) {
      // The planner's greedy placement for this batch: as much on the GPU as the budget leaves,
      // then pinned CPU memory, then disk.
      engine::PlanRequest r;
      r.config = *config;
      FERRY_ASSIGN_OR_RETURN(r.layouts, engine::LayoutsOfStore(store, engine::Allowance()));
      r.device_budget = bo.memory_budget_bytes;
      r.host_budget = bo.host_budget_bytes;
      absl::Status offload_error;
      r.offload = [&](const engine::Policy& p, uint64_t device_budget, uint64_t host_budget) {
        auto o = offload_of(p.split, device_budget, host_budget);
        if (!o.ok()) offload_error = o.status();
        return o.ok() ? *o : engine::OffloadOptions();
      };
      engine::Policy p;
      p.gpu_batch_size = static_cast<int>(rows);
      auto c = engine::PlaceWeights(r, r.layouts[0].second, p, nullptr, *l.backend);
      FERRY_RETURN_IF_ERROR(offload_error);
      if (!c.ok()) return absl::Status(c.status().code(), absl::StrCat("--policy auto: ", c.status().message()));
      split = c->policy.split;
      offloaded = true;
      std::fprintf(stderr, "ferry: policy auto: --weights %g,%g,%g%s\n", split.gpu, split.cpu, split.disk,
                   fits ? "" : " (the store's weights do not fit --gpu-mem)");
    }
  }
  if (!f.quantize.empty() && !f.weights.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--quantize quantizes a resident model at load; an offloaded model streams "
                                                   "its store's bytes as they are: ferry convert --quantize ", f.quantize,
                                                   " --model ", f.model, " --out STORE, then --weights with --model STORE"));
  }
  if (!offloaded) {
    engine::GgufLoadOptions go;
    FERRY_ASSIGN_OR_RETURN(go.dtype, GgufDtype(f.gguf_dtype));
    if (!f.quantize.empty()) {
      FERRY_ASSIGN_OR_RETURN(go.quantize, MakeQuantFormat(f.quantize, f.quant_group));
    }
    FERRY_ASSIGN_OR_RETURN(l.model, engine::Model::Load(f.model, l.backend.get(), go));
  } else {
    if (!is_store) {
      return absl::InvalidArgumentError(absl::StrCat("--weights reads a ferry store; convert first: ferry convert --model ",
                                                     f.model, " --out STORE"));
    }
    FERRY_ASSIGN_OR_RETURN(const engine::OffloadOptions o, offload_of(split, bo.memory_budget_bytes, bo.host_budget_bytes));
    FERRY_ASSIGN_OR_RETURN(l.model, engine::Model::LoadOffloaded(f.model, l.backend.get(), o));
  }
  l.offloaded = offloaded;
  if (l.tokenizer->vocab_size() > l.model->config().vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer has ", l.tokenizer->vocab_size(), " tokens but the model only ",
                                                   l.model->config().vocab_size));
  }
  return l;
}

struct GenerateFlags {
  ModelFlags model;
  std::string prompt, input, output;
  int max_new_tokens = 32;
  int min_new_tokens = 0;
  int batch_size = 16;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  std::string seed = "0";
  bool ignore_eos = false;
  bool quiet = false;
  bool resume = false, overwrite = false;
  std::string input_format = "auto";
  std::string shard = "auto";
  std::string shard_by = "index";
  std::string on_bad_request = "fail";
  std::vector<std::string> stop;
  std::string h2o;
  int protect = 0;
  std::string sparsity;
  double sparsity_k = 0.15;
  double sparsity_cache = 0.0;
};

absl::Status RunGenerate(const GenerateFlags& f) {
  if (f.prompt.empty() == f.input.empty()) return absl::InvalidArgumentError("give exactly one of --prompt or --input");
  engine::GenerateOptions gen;
  gen.max_new_tokens = f.max_new_tokens;
  gen.min_new_tokens = f.min_new_tokens;
  uint64_t seed = 0;
  if (!absl::SimpleAtoi(f.seed, &seed)) {
    return absl::InvalidArgumentError(absl::StrCat("--seed \"", f.seed, "\" is not an integer in [0, 2^64)"));
  }
  gen.sampling = {f.temperature, f.top_k, f.top_p, seed};
  gen.stop_at_eos = !f.ignore_eos;
  FERRY_ASSIGN_OR_RETURN(gen.h2o, ParseH2O(f.h2o, f.protect, 0));
  FERRY_RETURN_IF_ERROR(engine::ValidateGenerateOptions(gen));
  // Before the model loads (minutes for a large one): an output that would be lost is refused.
  if (f.resume && f.input.empty()) return absl::InvalidArgumentError("--resume continues an --input job");
  engine::Shard shard;
  std::optional<engine::BatchFormat> input_format;
  if (!f.input.empty()) {
    FERRY_ASSIGN_OR_RETURN(shard, engine::ParseShard(f.shard));
    shard.by_id = f.shard_by == "id";
    if (f.input_format != "auto") {
      FERRY_ASSIGN_OR_RETURN(input_format, engine::ParseBatchFormat(f.input_format));
    }
  } else if (f.shard != "auto" || !f.stop.empty() || f.on_bad_request != "fail" || f.input_format != "auto") {
    return absl::InvalidArgumentError("--shard, --stop, --on-bad-request and --input-format go with --input");
  }
  const std::string output = f.output.empty() || f.output == "-" ? f.output : engine::ShardOutputPath(f.output, shard);
  if (!f.resume && !f.overwrite && !output.empty() && output != "-") FERRY_RETURN_IF_ERROR(engine::RefuseExistingOutput(output));
  const int64_t rows = f.input.empty() ? 1 : f.batch_size;
  // --sparsity: with --weights the executor fetches only the predicted neurons' bundles (any
  // backend); on a resident model a hook zeroes the others (any backend; on a GPU the activations
  // make a round trip through the host, which is for evaluation, not speed).
  const bool sparse_exec = !f.sparsity.empty() && !f.model.weights.empty();
  if (f.sparsity_cache > 0.0 && !sparse_exec) return absl::InvalidArgumentError("--sparsity-cache needs --sparsity and --weights");
  // Offloaded, a batch's prompts prefill in one call (the weights cross the link once), in
  // micro-batches of gen.max_prefill_tokens.
  FERRY_ASSIGN_OR_RETURN(Loaded l, LoadAll(f.model, rows, std::max<int64_t>(gen.max_prefill_tokens, rows), sparse_exec,
                                           f.sparsity_cache, /*whole_prefill=*/true));
  if (l.offloaded) gen.prefill_call_tokens = rows * l.model->config().max_positions;
  FERRY_ASSIGN_OR_RETURN(gen.kv_dtype, KvDtype(f.model, l.model->config()));
  std::optional<engine::SparseFfn> sparse;
  std::function<absl::Status(int, const TensorView&, const TensorView&)> hook;
  engine::FfnSelector select;
  if (!f.sparsity.empty()) {
    FERRY_ASSIGN_OR_RETURN(sparse, engine::SparseFfn::Load(f.sparsity, l.model->config()));
    sparse->set_k_fraction(f.sparsity_k);
    if (sparse_exec) {
      select = sparse->Selector(*l.backend);
      gen.ffn_select = &select;
    } else {
      hook = sparse->Hook(l.backend.get());
      gen.ffn_hook = &hook;
    }
  }
  if (!f.input.empty()) {
    engine::GenerateJobOptions job;
    job.input_path = f.input;
    job.output_path = f.output;
    job.format = input_format;
    job.shard = shard;
    job.stop = f.stop;
    job.record_bad_requests = f.on_bad_request == "record";
    FERRY_ASSIGN_OR_RETURN(job.chat, engine::LoadChatFormat(f.model.model));
    job.model_name = f.model.model;
    while (job.model_name.size() > 1 && job.model_name.back() == '/') job.model_name.pop_back();
    job.model_name = job.model_name.substr(job.model_name.find_last_of('/') + 1);
    job.batch_size = f.batch_size;
    job.generate = gen;
    job.show_progress = !f.quiet;
    job.resume = f.resume;
    job.overwrite = f.overwrite;
    job.parameters = {{"model", f.model.model}, {"weights", f.model.weights}, {"max_new_tokens", f.max_new_tokens},
                      {"min_new_tokens", f.min_new_tokens}, {"temperature", f.temperature}, {"top_k", f.top_k},
                      {"top_p", f.top_p}, {"seed", seed}, {"ignore_eos", f.ignore_eos}, {"h2o", f.h2o},
                      {"protect", f.protect}, {"kv_dtype", f.model.kv_dtype}, {"sparsity", f.sparsity},
                      {"sparsity_k", f.sparsity.empty() ? 0.0 : f.sparsity_k}};
    return engine::RunGenerateJob(*l.model, *l.tokenizer, job);
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<int> ids, l.tokenizer->Encode(f.prompt));
  const auto start = std::chrono::steady_clock::now();
  FERRY_ASSIGN_OR_RETURN(auto results, engine::Generate(*l.model, {{ids, 0}}, gen));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  FERRY_ASSIGN_OR_RETURN(std::string text, l.tokenizer->Decode(results[0].tokens));
  if (!f.output.empty()) {
    nlohmann::json rec = {{"id", 0}, {"prompt", f.prompt}, {"completion", text},
                          {"token_ids", results[0].tokens}, {"finish_reason", results[0].finish_reason}};
    FERRY_ASSIGN_OR_RETURN(RecordFile out, RecordFile::Open(f.output));
    FERRY_RETURN_IF_ERROR(out.Truncate(0));
    FERRY_RETURN_IF_ERROR(out.Append(rec.dump() + "\n"));
    FERRY_RETURN_IF_ERROR(out.Close());
  } else {
    FERRY_ASSIGN_OR_RETURN(RecordFile out, RecordFile::Open("-"));
    FERRY_RETURN_IF_ERROR(out.Append(text + "\n"));
  }
  if (!f.quiet) {
    std::fprintf(stderr, "ferry: %zu prompt tokens, %zu new tokens in %.3f s (%.1f tok/s), finish: %s\n", ids.size(),
                 results[0].tokens.size(), secs, results[0].tokens.size() / std::max(secs, 1e-9),
                 results[0].finish_reason.c_str());
  }
  return absl::OkStatus();
}

struct TokenizeFlags {
  ModelFlags model;
  std::string text, file;
  bool no_bos = false;
  std::string export_json;
};

absl::Status RunTokenize(const TokenizeFlags& f) {
  if (!f.export_json.empty()) {
    if (!engine::IsGgufFile(f.model.model)) return absl::InvalidArgumentError("--export-json needs a GGUF --model");
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<io::GgufFile> file, io::GgufFile::Open(f.model.model));
    FERRY_ASSIGN_OR_RETURN(const std::string json, engine::TokenizerJsonFromGguf(*file));
    FERRY_RETURN_IF_ERROR(engine::Tokenizer::FromTokenizerJson(json).status());
    return WriteFileAtomically(f.export_json, json);
  }
  if (f.text.empty() == f.file.empty()) return absl::InvalidArgumentError("give exactly one of --text or --file");
  FERRY_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(f.model));
  std::string text = f.text;
  if (!f.file.empty()) {
    FERRY_ASSIGN_OR_RETURN(text, ReadFileToString(f.file));
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<int> ids, f.no_bos ? tok->EncodeNoPrefix(text) : tok->Encode(text));
  std::printf("%s\n", nlohmann::json(ids).dump().c_str());
  return absl::OkStatus();
}

struct PplFlags {
  ModelFlags model;
  std::string text_file;
  int window = 512;
  int64_t max_tokens = 0;
  bool json = false;
  bool quiet = false;
  bool keep_cr = false;
  std::string h2o;  // HEAVY,RECENT
  int protect = 0;
  int local = 0;
  std::string sparsity;
  double sparsity_k = 0.15;
};

absl::Status RunPpl(const PplFlags& f) {
  const int64_t windows_per_call = std::max(1, 2048 / f.window);
  FERRY_ASSIGN_OR_RETURN(Loaded l, LoadAll(f.model, windows_per_call, windows_per_call * f.window));
  FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(f.text_file));
  if (!f.keep_cr) text = engine::NormalizeNewlines(text);
  const auto start = std::chrono::steady_clock::now();
  FERRY_ASSIGN_OR_RETURN(std::vector<int> ids, l.tokenizer->Encode(text));
  engine::PerplexityOptions o;
  FERRY_ASSIGN_OR_RETURN(o.kv_dtype, KvDtype(f.model, l.model->config()));
  o.window = f.window;
  o.max_tokens = f.max_tokens;
  FERRY_ASSIGN_OR_RETURN(o.h2o, ParseH2O(f.h2o, f.protect, f.local));
  std::optional<engine::SparseFfn> sparse;
  std::function<absl::Status(int, const TensorView&, const TensorView&)> hook;
  if (!f.sparsity.empty()) {
    FERRY_ASSIGN_OR_RETURN(sparse, engine::SparseFfn::Load(f.sparsity, l.model->config()));
    sparse->set_k_fraction(f.sparsity_k);
    hook = sparse->Hook(l.backend.get());
    o.ffn_hook = &hook;
  }
  if (!f.quiet) {
    o.progress = [](int64_t done, int64_t total) {
      std::fprintf(stderr, "\rferry: ppl %lld/%lld tokens", static_cast<long long>(done), static_cast<long long>(total));
      if (done == total) std::fputc('\n', stderr);
    };
  }
  FERRY_ASSIGN_OR_RETURN(engine::PerplexityResult r, engine::ComputePerplexity(*l.model, ids, o));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (f.json) {
    nlohmann::json j = {{"perplexity", r.perplexity}, {"nll_sum", r.nll_sum}, {"scored_tokens", r.scored_tokens},
                        {"tokens", r.tokens}, {"windows", r.windows}, {"window", f.window}, {"seconds", secs}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("perplexity %.4f over %lld scored tokens (%lld tokens, %lld windows of %d) in %.2f s\n", r.perplexity,
                static_cast<long long>(r.scored_tokens), static_cast<long long>(r.tokens),
                static_cast<long long>(r.windows), f.window, secs);
  }
  return absl::OkStatus();
}

struct ConvertFlags {
  std::string model = DefaultModelDir();
  std::string out;
  std::string gguf_dtype = "f16";
  std::string quantize;
  int quant_group = 64;
  bool verify = false;
  bool quiet = false;
};

// Prints "label: x/y MiB (p%), r MiB/s" on one stderr line, at most every half second.
std::function<void(uint64_t, uint64_t)> ByteProgress(const std::string& label, bool quiet) {
  if (quiet) return nullptr;
  auto start = std::chrono::steady_clock::now();
  auto last = std::make_shared<double>(-1.0);
  return [label, start, last](uint64_t done, uint64_t total) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (done < total && s - *last < 0.5) return;
    *last = s;
    std::fprintf(stderr, "\rferry: %s %.1f/%.1f MiB (%.0f%%), %.0f MiB/s", label.c_str(), done / 1048576.0,
                 total / 1048576.0, total ? 100.0 * done / total : 100.0, s > 0 ? done / 1048576.0 / s : 0.0);
    if (done >= total) std::fputc('\n', stderr);
  };
}

absl::Status RunConvert(const ConvertFlags& f) {
  FERRY_RETURN_IF_ERROR(CheckModelDir(f.model));
  if (PathExists(f.out + "/manifest.json")) {
    return absl::AlreadyExistsError(absl::StrCat(f.out, " already holds a store; remove it first"));
  }
  io::ConvertOptions o;
  o.progress = ByteProgress("convert", f.quiet);
  engine::GgufLoadOptions go;
  FERRY_ASSIGN_OR_RETURN(go.dtype, GgufDtype(f.gguf_dtype));
  std::map<std::string, int> mapped, requantized;
  if (!f.quantize.empty()) {
    FERRY_ASSIGN_OR_RETURN(go.quantize, MakeQuantFormat(f.quantize, f.quant_group));
    o.mapped = &mapped;
    o.requantized = &requantized;
  }
  FERRY_RETURN_IF_ERROR(engine::ConvertModel(f.model, f.out, o, go));
  if (go.quantize && !f.quiet) {
    // Which matrices kept the file's own blocks and which were rounded from their values.
    std::string report;
    for (const auto& [type, n] : mapped) absl::StrAppend(&report, report.empty() ? "" : ", ", n, " ", type, " mapped without rounding");
    for (const auto& [type, n] : requantized) absl::StrAppend(&report, report.empty() ? "" : ", ", n, " ", type, " quantized from their values");
    std::fprintf(stderr, "ferry: layer matrices as %s: %s\n", QuantFormatName(*go.quantize).c_str(),
                 report.empty() ? "none" : report.c_str());
  }
  if (f.verify) {
    FERRY_ASSIGN_OR_RETURN(io::Store store, io::Store::Open(f.out));
    FERRY_RETURN_IF_ERROR(store.Verify(ByteProgress("verify", f.quiet)));
  }
  if (!f.quiet) std::fprintf(stderr, "ferry: store written to %s\n", f.out.c_str());
  return absl::OkStatus();
}

struct VerifyFlags {
  std::string store;
  bool quiet = false;
};

absl::Status RunVerify(const VerifyFlags& f) {
  FERRY_ASSIGN_OR_RETURN(io::Store store, io::Store::Open(f.store));
  FERRY_RETURN_IF_ERROR(store.Verify(ByteProgress("verify", f.quiet)));
  if (PathExists(f.store + "/config.json")) FERRY_RETURN_IF_ERROR(engine::CheckStoreModel(store));
  std::printf("ok: %zu tensors, %.1f MiB, every checksum matches\n", store.Names().size(), store.data_bytes() / 1048576.0);
  return absl::OkStatus();
}

}  // namespace

// --h2o HEAVY,RECENT [--protect N] or --local N (a recent-only window) into cache options.
absl::StatusOr<std::optional<offload::H2OOptions>> ParseH2O(const std::string& spec, int protect, int local) {
  if (!spec.empty()) {
    std::vector<std::string> parts = absl::StrSplit(spec, ',');
    int heavy = 0, recent = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &heavy) || !absl::SimpleAtoi(parts[1], &recent) || heavy < 0 ||
        recent < 0 || static_cast<int64_t>(heavy) + recent < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--h2o wants HEAVY,RECENT slot counts, got \"", spec, "\""));
    }
    return std::optional<offload::H2OOptions>(offload::H2OOptions{heavy, recent, protect});
  }
  if (protect > 0) return absl::InvalidArgumentError("--protect goes with --h2o");
  if (local > 0) return std::optional<offload::H2OOptions>(offload::H2OOptions{0, local, 0});
  return std::optional<offload::H2OOptions>();
}

std::string DefaultModelDir() {
  if (const char* env = std::getenv("FERRY_MODEL"); env != nullptr && *env != '\0') return env;
  if (PathExists(FERRY_DEFAULT_MODEL_DIR)) return FERRY_DEFAULT_MODEL_DIR;
  return "models/tiny-opt";
}

void RegisterCommands(CLI::App& app, Runner* selected) {
  // Flags live as long as the process: the runner reads them after parsing.
  static GenerateFlags gen;
  CLI::App* g = app.add_subcommand("generate", "Generate completions for one prompt or a JSONL file of prompts");
  AddModelFlags(g, &gen.model);
  AddKvDtypeFlag(g, &gen.model);
  AddQuantizeFlags(g, &gen.model);
  auto* prompt = g->add_option("--prompt", gen.prompt, "Prompt text");
  auto* input = g->add_option("--input", gen.input, "JSONL file of requests: {\"id\", \"prompt\"} lines, or OpenAI Batch lines (completions or chat)");
  prompt->excludes(input);
  g->add_option("--output", gen.output, "JSONL output (default: stdout; with --prompt, plain text to stdout)");
  g->add_option("--max-new-tokens", gen.max_new_tokens, "Tokens to generate per prompt")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  g->add_option("--min-new-tokens", gen.min_new_tokens, "Suppress end-of-sequence until this many tokens exist")
      ->check(CLI::NonNegativeNumber);
  g->add_option("--batch-size", gen.batch_size, "Prompts per batch for --input")->check(CLI::PositiveNumber)->capture_default_str();
  g->add_option("--temperature", gen.temperature, "Sampling temperature (0: greedy)")->check(CLI::NonNegativeNumber)->capture_default_str();
  g->add_option("--top-k", gen.top_k, "Sample from the k most likely tokens (0: off)")->check(CLI::NonNegativeNumber);
  g->add_option("--top-p", gen.top_p, "Nucleus sampling mass in (0, 1] (1: off)")->check(CLI::Range(0.0, 1.0));
  g->add_option("--seed", gen.seed, "Random seed: the same seed gives the same text")->capture_default_str();
  g->add_option("--h2o", gen.h2o, "H2O KV eviction: HEAVY,RECENT slots per head (default: the full cache)");
  g->add_option("--sparsity", gen.sparsity, "Deja Vu predictors (from `ferry sparsity train`): keep only predicted FFN neurons");
  g->add_option("--sparsity-k", gen.sparsity_k, "Fraction of FFN neurons kept per token with --sparsity")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  g->add_option("--sparsity-cache", gen.sparsity_cache,
                "With --sparsity and --weights: keep this fraction of each FFN's bundles on the GPU (most recently used)")
      ->check(CLI::Range(0.0, 1.0));
  g->add_option("--protect", gen.protect, "With --h2o: never evict the first N positions")->check(CLI::NonNegativeNumber);
  g->add_flag("--ignore-eos", gen.ignore_eos, "Keep generating after the end-of-sequence token");
  auto* resume = g->add_flag("--resume", gen.resume,
                             "Continue an interrupted --input job: keep the --output's records, generate the rest");
  g->add_flag("--overwrite", gen.overwrite, "Replace an existing --output file (it is refused otherwise)")->excludes(resume);
  g->add_flag("--quiet,-q", gen.quiet, "No progress or timing on stderr");
  g->add_option("--input-format", gen.input_format,
                "--input lines: ferry ({\"id\", \"prompt\"}), openai (the OpenAI Batch format), or auto (from the first line)")
      ->check(CLI::IsMember({"auto", "ferry", "openai"}))
      ->capture_default_str();
  g->add_option("--stop", gen.stop, "Stop sequence (repeatable): a completion ends before its first match (requests may give their own)");
  g->add_option("--on-bad-request", gen.on_bad_request,
                "A request that cannot be served: fail (the job, before any generation, naming its line) or record (an error record)")
      ->check(CLI::IsMember({"fail", "record"}))
      ->capture_default_str();
  g->add_option("--shard", gen.shard,
                "Serve share I of N of the --input (I/N), writing OUTPUT.shard-IIIII-of-NNNNN; auto: from SLURM_ARRAY_TASK_ID/"
                "SLURM_ARRAY_TASK_COUNT or JOB_COMPLETION_INDEX/FERRY_SHARD_COUNT when set")
      ->capture_default_str();
  g->add_option("--shard-by", gen.shard_by, "Partition records by their index in the input, or by a hash of their id")
      ->check(CLI::IsMember({"index", "id"}))
      ->capture_default_str();
  g->callback([selected] { *selected = [] { return RunGenerate(gen); }; });

  static engine::MergeOptions mergef;
  static std::string merge_format = "auto";
  static bool merge_quiet = false;
  CLI::App* m = app.add_subcommand("merge", "Join the outputs of a sharded generate job into one file in input order");
  m->add_option("--input", mergef.input_path, "The job's --input file (the order and the ids)")->required();
  m->add_option("--output", mergef.output_path, "The merged output")->required();
  m->add_option("--input-format", merge_format, "ferry, openai or auto")->check(CLI::IsMember({"auto", "ferry", "openai"}))->capture_default_str();
  m->add_flag("--overwrite", mergef.overwrite, "Replace an existing --output file");
  m->add_flag("--quiet,-q", merge_quiet, "No summary on stderr");
  m->add_option("shards", mergef.shard_paths, "The shard outputs (OUTPUT.shard-*-of-*)")->required();
  m->callback([selected] {
    *selected = [] {
      if (merge_format != "auto") {
        FERRY_ASSIGN_OR_RETURN(mergef.format, engine::ParseBatchFormat(merge_format));
      }
      mergef.show_progress = !merge_quiet;
      return engine::MergeShards(mergef);
    };
  });

  static TokenizeFlags tokf;
  CLI::App* t = app.add_subcommand("tokenize", "Print the token ids of a text as JSON");
  AddModelFlags(t, &tokf.model);
  auto* text = t->add_option("--text", tokf.text, "Text to tokenize");
  t->add_option("--file", tokf.file, "File to tokenize")->excludes(text);
  t->add_flag("--no-bos", tokf.no_bos, "Do not prepend the BOS token");
  t->add_option("--export-json", tokf.export_json, "Write the tokenizer of a GGUF --model as tokenizer.json (Hugging Face format) to this path")
      ->excludes(text);
  t->callback([selected] { *selected = [] { return RunTokenize(tokf); }; });

  static PplFlags pplf;
  CLI::App* p = app.add_subcommand("ppl", "Perplexity of a text file (one document, non-overlapping windows)");
  AddModelFlags(p, &pplf.model);
  AddKvDtypeFlag(p, &pplf.model);
  AddQuantizeFlags(p, &pplf.model);
  p->add_option("--text", pplf.text_file, "Text file")->required();
  p->add_option("--window", pplf.window, "Window length in tokens")->check(CLI::Range(2, 1 << 20))->capture_default_str();
  p->add_option("--max-tokens", pplf.max_tokens, "Use only the first N tokens (0: all)")->check(CLI::NonNegativeNumber);
  auto* h2o = p->add_option("--h2o", pplf.h2o, "Evaluate through an H2O evicting KV cache of HEAVY,RECENT slots per head, token by token");
  p->add_option("--protect", pplf.protect, "With --h2o: never evict the first N positions")->check(CLI::NonNegativeNumber);
  p->add_option("--local", pplf.local, "Evaluate with a recent-window-only cache of N entries per head")
      ->check(CLI::PositiveNumber)->excludes(h2o);
  p->add_option("--sparsity", pplf.sparsity, "Deja Vu predictors (from `ferry sparsity train`): keep only predicted FFN neurons");
  p->add_option("--sparsity-k", pplf.sparsity_k, "Fraction of FFN neurons kept per token with --sparsity")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str();
  p->add_flag("--keep-cr", pplf.keep_cr, "Keep \\r bytes (default: \\r\\n and \\r read as \\n, as Python's text mode)");
  p->add_flag("--json", pplf.json, "Print the result as JSON");
  p->add_flag("--quiet,-q", pplf.quiet, "No progress on stderr");
  p->callback([selected] { *selected = [] { return RunPpl(pplf); }; });

  static ConvertFlags convf;
  CLI::App* c = app.add_subcommand("convert", "Convert a Hugging Face checkpoint or a GGUF file into a ferry store (the disk tier's format)");
  c->add_option("--model", convf.model, "Hugging Face model directory or GGUF file")->capture_default_str();
  AddGgufDtypeFlag(c, &convf.gguf_dtype);
  c->add_option("--out", convf.out, "Store directory to create")->required();
  c->add_option("--quantize", convf.quantize,
                "Store the layer matrices quantized: q4 (asymmetric 4-bit, fp16 scale and minimum per group) or q8 (symmetric "
                "8-bit); GGUF Q4_0/Q4_1/Q8_0 blocks map onto q4/q8 with --quant-group 32 without rounding")
      ->check(CLI::IsMember({"q4", "q8"}));
  c->add_option("--quant-group", convf.quant_group, "Values per quantization group along a matrix row")->capture_default_str();
  c->add_flag("--verify", convf.verify, "Read the store back and check every checksum");
  c->add_flag("--quiet,-q", convf.quiet, "No progress on stderr");
  c->callback([selected] { *selected = [] { return RunConvert(convf); }; });

  RegisterBenchCommand(app, selected);
  RegisterSparsityCommand(app, selected);
  RegisterPlanCommand(app, selected);  // and probe


  static VerifyFlags verf;
  CLI::App* v = app.add_subcommand("verify", "Check every checksum of a ferry store");
  v->add_option("--store", verf.store, "Store directory")->required();
  v->add_flag("--quiet,-q", verf.quiet, "No progress on stderr");
  v->callback([selected] { *selected = [] { return RunVerify(verf); }; });
}

}  // namespace ferry::cli
