// `ferry bench`: FlexGen-style throughput benchmark on a real or dummy model through the
// offloading executor.
#include <cstdio>
#include <fstream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "engine/bench.h"
#include "engine/cli/commands.h"
#include "engine/dummy_model.h"
#include "engine/model.h"
#include "io/store.h"
#include "nlohmann/json.hpp"

namespace ferry::cli {
namespace {

struct BenchFlags {
  std::string model, dummy, store, weights = "100,0,0", kv = "gpu", kv_dtype = "f32", gpu_mem, cpu_mem, device = "cpu", json;
  int prompt_len = 512, gen_len = 32, gpu_batch_size = 1, num_gpu_batches = 1;
  unsigned queue_depth = 16;
  std::string block_size = "1MiB";
  uint64_t seed = 1;
  bool quiet = false;
  std::string h2o;
  bool fit_batch = false;
  double sparsity_sim = 0.0, sparsity_k = 0.15, sparsity_dense_above = 0.9, sparsity_cache = 0.0;
  std::string sparsity;
  std::string quantize;
  int quant_group = 64;
};

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
    FERRY_ASSIGN_OR_RETURN(quant, MakeQuantFormat(f.quantize, f.quant_group));
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
  if (!f.dummy.empty()) {
    FERRY_ASSIGN_OR_RETURN(engine::DummyShape shape, engine::FindDummyShape(f.dummy));
    if (f.store.empty()) return absl::InvalidArgumentError("--dummy needs --store DIR (the store is created there once)");
    if (PathExists(f.store + "/manifest.json")) {
      FERRY_ASSIGN_OR_RETURN(std::string cfg, ReadFileToString(f.store + "/config.json"));
      auto j = nlohmann::json::parse(cfg, nullptr, false);
      if (j.is_discarded() || j.value("_ferry_dummy", std::string()) != f.dummy) {
        return absl::InvalidArgumentError(absl::StrCat(f.store, " holds another model than dummy ", f.dummy));
      }
      FERRY_RETURN_IF_ERROR(CheckStoreQuant(f.store, quant));
      return f.store;
    }
    if (!f.quiet) {
      std::fprintf(stderr, "ferry: writing dummy %s (%.1f GiB of fp16 weights%s) to %s\n", f.dummy.c_str(),
                   engine::DummyWeightBytes(shape) / 1073741824.0, quant ? ", layer matrices quantized" : "", f.store.c_str());
    }
    engine::DummyStoreOptions o;
    o.quantize = quant;
    o.progress = progress("dummy weights");
    FERRY_RETURN_IF_ERROR(engine::WriteDummyStore(shape, f.store, o));
    return f.store;
  }
  const std::string model = f.model.empty() ? DefaultModelDir() : f.model;
  if (PathExists(model + "/manifest.json")) {
    FERRY_RETURN_IF_ERROR(CheckStoreQuant(model, quant));
    return model;
  }
  if (f.store.empty()) return absl::InvalidArgumentError("--model is a Hugging Face checkpoint: give --store DIR to convert it into");
  if (!PathExists(f.store + "/manifest.json")) {
    io::ConvertOptions o;
    o.progress = progress("convert");
    engine::GgufLoadOptions go;
    go.quantize = quant;
    FERRY_RETURN_IF_ERROR(engine::ConvertModel(model, f.store, o, go));
  }
  FERRY_RETURN_IF_ERROR(CheckStoreQuant(f.store, quant));
  return f.store;
}

absl::Status RunBenchCommand(const BenchFlags& f) {
  engine::BenchOptions o;
  o.kv_on_cpu = f.kv == "cpu";
  // f32 / f16 now; q8 / q4 once the store's head_dim is known (below).
  FERRY_ASSIGN_OR_RETURN(o.split, offload::ParseWeightSplit(f.weights));
  if (!f.gpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(o.backend.memory_budget_bytes, offload::ParseBytes(f.gpu_mem));
  }
  if (!f.cpu_mem.empty()) {
    FERRY_ASSIGN_OR_RETURN(o.backend.host_budget_bytes, offload::ParseBytes(f.cpu_mem));
  }
  FERRY_ASSIGN_OR_RETURN(const uint64_t block, offload::ParseBytes(f.block_size));
  o.backend.name = f.device;
  o.prompt_len = f.prompt_len;
  o.gen_len = f.gen_len;
  o.gpu_batch_size = f.gpu_batch_size;
  o.num_gpu_batches = f.num_gpu_batches;
  o.uring.queue_depth = f.queue_depth;
  o.uring.block_bytes = block;
  o.seed = f.seed;
  o.fit_batch = f.fit_batch;
  o.sparsity_sim = f.sparsity_sim;
  o.sparsity_dir = f.sparsity;
  o.sparsity_k = f.sparsity_k;
  o.sparsity_dense_above = f.sparsity_dense_above;
  o.sparsity_cache = f.sparsity_cache;
  FERRY_ASSIGN_OR_RETURN(o.h2o, ParseH2O(f.h2o, 0, 0));
  if (!f.quiet) o.progress = [](const std::string& s) { std::fprintf(stderr, "ferry: %s\n", s.c_str()); };
  FERRY_ASSIGN_OR_RETURN(o.store_dir, PrepareStore(f));
  {
    FERRY_ASSIGN_OR_RETURN(const engine::ModelConfig config, engine::ModelConfig::FromModelDir(o.store_dir));
    FERRY_ASSIGN_OR_RETURN(o.kv_dtype, ParseKvType(f.kv_dtype, config.head_dim()));
  }
  FERRY_ASSIGN_OR_RETURN(engine::BenchResult r, engine::RunBench(o));
  std::fputs(r.Table().c_str(), stdout);
  if (!f.json.empty()) {
    std::ofstream out(f.json);
    out << r.json.dump(1) << "\n";
    if (!out) return absl::DataLossError(absl::StrCat("cannot write ", f.json));
  }
  return absl::OkStatus();
}

}  // namespace

void RegisterBenchCommand(CLI::App& app, Runner* selected) {
  static BenchFlags f;
  CLI::App* b = app.add_subcommand("bench", "Throughput benchmark (FlexGen's metrics) through the offloading executor");
  auto* model = b->add_option("--model", f.model, "Hugging Face checkpoint or ferry store (default: the embedded model)");
  b->add_option("--dummy", f.dummy, "Dummy model with random weights: opt-125m, opt-1.3b, opt-6.7b, opt-13b, opt-30b, opt-66b, opt-175b")
      ->excludes(model);
  b->add_option("--store", f.store, "Store directory: created once (dummy or converted checkpoint), then reused");
  b->add_option("--prompt-len", f.prompt_len, "Prompt tokens")->check(CLI::PositiveNumber)->capture_default_str();
  b->add_option("--gen-len", f.gen_len, "Generated tokens")->check(CLI::PositiveNumber)->capture_default_str();
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
  b->add_option("--quant-group", f.quant_group, "Values per quantization group")->capture_default_str();
  b->add_option("--gpu-mem", f.gpu_mem, "Device memory budget, e.g. 24GiB (default: none)");
  b->add_option("--cpu-mem", f.cpu_mem, "Pinned host memory budget, e.g. 64GiB (default: none)");
  b->add_option("--device", f.device, "Backend")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  b->add_option("--queue-depth", f.queue_depth, "io_uring queue depth for disk reads")->check(CLI::Range(1, 4096))->capture_default_str();
  b->add_option("--block-size", f.block_size, "io_uring request size (multiple of 4 KiB)")->capture_default_str();
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
  b->add_flag("--quiet,-q", f.quiet, "No progress on stderr");
  b->callback([selected] { *selected = [] { return RunBenchCommand(f); }; });
}

}  // namespace ferry::cli
