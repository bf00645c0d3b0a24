// `ferry sparsity collect|train|report`: Deja Vu predictors for a model (collect and train on the
// CPU or a GPU).
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/status.h"
#include "engine/cli/commands.h"
#include "engine/perplexity.h"
#include "engine/sparsity.h"
#include "engine/tokenizer.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/registry.h"
#include "nlohmann/json.hpp"

namespace ferry::cli {
namespace {

struct CollectFlags {
  std::string model = DefaultModelDir(), text, out, device = "cpu";
  int64_t tokens = 0;
  int window = 512;
  bool quiet = false;
};

struct TrainFlags {
  std::string data, out, device = "cpu";
  engine::TrainOptions options;
  bool quiet = false;
};

struct ReportFlags {
  std::string data, predictors;
  double k = 0.15;
};

absl::Status RunCollect(const CollectFlags& f) {
  if (!PathExists(f.model + "/config.json")) return absl::NotFoundError(absl::StrCat("no model at ", f.model));
  kernels::BackendOptions bo;
  bo.name = f.device;
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(bo));
  FERRY_ASSIGN_OR_RETURN(auto model, engine::Model::Load(f.model, backend.get()));
  FERRY_ASSIGN_OR_RETURN(auto tok, engine::Tokenizer::FromModelDir(f.model));
  FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(f.text));
  FERRY_ASSIGN_OR_RETURN(std::vector<int> ids, tok->Encode(engine::NormalizeNewlines(text)));
  engine::CollectOptions o;
  o.tokens = f.tokens;
  o.window = f.window;
  if (!f.quiet) {
    o.progress = [](int64_t done, int64_t total) {
      std::fprintf(stderr, "\rferry: collect %lld/%lld tokens", static_cast<long long>(done), static_cast<long long>(total));
      if (done == total) std::fputc('\n', stderr);
    };
  }
  return engine::CollectActivations(*model, ids, f.out, o);
}

absl::Status RunTrain(const TrainFlags& f) {
  engine::TrainOptions o = f.options;
  kernels::BackendOptions bo;
  bo.name = f.device;
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(bo));
  o.backend = backend.get();
  if (!f.quiet) o.progress = [](const std::string& s) { std::fprintf(stderr, "ferry: %s\n", s.c_str()); };
  FERRY_ASSIGN_OR_RETURN(auto layers, engine::TrainPredictors(f.data, f.out, o));
  for (const auto& l : layers) {
    std::printf("layer %d: %.1f%% active, %s\n", l.layer, 100 * l.active_fraction,
                l.dense ? "dense" : absl::StrCat("recall ", l.recall_at_k, " at ", 100 * o.k_fraction, "%").c_str());
  }
  return absl::OkStatus();
}

absl::Status RunReport(const ReportFlags& f) {
  std::optional<engine::SparseFfn> predictors;
  if (!f.predictors.empty()) {
    FERRY_ASSIGN_OR_RETURN(std::string cfg, ReadFileToString(f.data + "/meta.json"));
    // The predictors carry their shapes; check them against the collected data's.
    engine::ModelConfig shape;
    auto j = nlohmann::json::parse(cfg, nullptr, false);
    if (j.is_discarded()) return absl::DataLossError(absl::StrCat(f.data, "/meta.json is not JSON"));
    shape.hidden_size = j.value("hidden", 0), shape.ffn_dim = j.value("ffn", 0), shape.num_layers = j.value("layers", 0);
    FERRY_ASSIGN_OR_RETURN(predictors, engine::SparseFfn::Load(f.predictors, shape));
  }
  FERRY_ASSIGN_OR_RETURN(engine::SparsityReport r,
                         engine::ReportSparsity(f.data, predictors ? &*predictors : nullptr, f.k));
  std::fputs(r.Table().c_str(), stdout);
  return absl::OkStatus();
}

}  // namespace

void RegisterSparsityCommand(CLI::App& app, Runner* selected) {
  CLI::App* sp = app.add_subcommand("sparsity", "Deja Vu contextual sparsity: collect, train, report");
  sp->require_subcommand(1);

  static CollectFlags cf;
  CLI::App* c = sp->add_subcommand("collect", "Record each layer's predictor input and FC1 activity on a text");
  c->add_option("--model", cf.model, "Model directory")->capture_default_str();
  c->add_option("--text", cf.text, "Text file")->required();
  c->add_option("--tokens", cf.tokens, "Use the first N tokens (0: all)")->check(CLI::NonNegativeNumber);
  c->add_option("--window", cf.window, "Window length")->check(CLI::Range(2, 1 << 20))->capture_default_str();
  c->add_option("--out", cf.out, "Output directory")->required();
  c->add_option("--device", cf.device, "Where the model runs")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  c->add_flag("--quiet,-q", cf.quiet, "No progress on stderr");
  c->callback([selected] { *selected = [] { return RunCollect(cf); }; });

  static TrainFlags tf;
  CLI::App* t = sp->add_subcommand("train", "Train a low-rank predictor per layer from collected data");
  t->add_option("--data", tf.data, "Directory written by `sparsity collect`")->required();
  t->add_option("--out", tf.out, "Where predictors.safetensors and sparsity.json go")->required();
  t->add_option("--rank", tf.options.rank, "Predictor rank")->check(CLI::PositiveNumber)->capture_default_str();
  t->add_option("--epochs", tf.options.epochs, "Most epochs (early stop on held-out recall)")->check(CLI::PositiveNumber)->capture_default_str();
  t->add_option("--lr", tf.options.learning_rate, "Adam learning rate")->capture_default_str();
  t->add_option("--k", tf.options.k_fraction, "Fraction of neurons kept, for recall")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  t->add_option("--dense-above", tf.options.dense_above, "Layers more active than this stay dense")->capture_default_str();
  t->add_option("--seed", tf.options.seed, "Seed")->capture_default_str();
  t->add_option("--device", tf.device, "Where the training runs")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  t->add_flag("--quiet,-q", tf.quiet, "No progress on stderr");
  t->callback([selected] { *selected = [] { return RunTrain(tf); }; });

  static ReportFlags rf;
  CLI::App* r = sp->add_subcommand("report", "Active fraction, recall at k and the union curve per layer");
  r->add_option("--data", rf.data, "Directory written by `sparsity collect`")->required();
  r->add_option("--predictors", rf.predictors, "Directory written by `sparsity train`");
  r->add_option("--k", rf.k, "Fraction of neurons kept")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  r->callback([selected] { *selected = [] { return RunReport(rf); }; });
}

}  // namespace ferry::cli
