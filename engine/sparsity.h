// Deja Vu contextual sparsity for ReLU FFNs: record what the dense model does (collect), train a
// low-rank predictor per layer (d -> rank -> ffn, no nonlinearity, with bias; class-balanced BCE,
// Adam, held-out recall), measure (report: active fraction, recall at k, the union curve), and
// run with only the predicted neurons (SparseFfn: per token the top-k predicted neurons of FC1
// are kept, the rest zeroed before FC2, which equals computing only the kept rows and columns).
// The predictor of layer l reads layer l's attention-block input, so its neurons are known
// before attention finishes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace ferry::engine {

struct CollectOptions {
  int64_t tokens = 0;  // 0: the whole text
  int window = 512;
  std::function<void(int64_t done, int64_t total)> progress;
};

// Writes DIR/meta.json and per layer DIR/layer-L.inputs (fp16 [tokens, d]) and DIR/layer-L.labels
// (bit-packed FC1 output > 0, [tokens, ceil(ffn / 8)]). CPU backend only.
absl::Status CollectActivations(Model& model, const std::vector<int>& ids, const std::string& out_dir,
                                const CollectOptions& options);

struct TrainOptions {
  int rank = 128;
  int epochs = 8;
  int batch = 512;
  float learning_rate = 2e-3f;
  double holdout = 0.1;       // the last tokens, for recall and early stopping
  double k_fraction = 0.15;   // recall is measured at this k
  double dense_above = 0.3;   // layers whose active fraction is above this stay dense
  uint64_t seed = 1;
  std::function<void(const std::string&)> progress;
  // Where the training runs (weights, gradients and Adam state in its memory); nullptr: the CPU.
  // The CPU and CUDA backends run the same steps (fp32 GEMMs, the same rule for every op).
  kernels::Backend* backend = nullptr;
};

struct LayerSparsity {
  int layer = 0;
  bool dense = true;
  double active_fraction = 0;
  double recall_at_k = 0;  // held out, predicted layers only
};

// Trains from a collect directory; writes DIR/predictors.safetensors and DIR/sparsity.json.
absl::StatusOr<std::vector<LayerSparsity>> TrainPredictors(const std::string& data_dir, const std::string& out_dir,
                                                           const TrainOptions& options);

// Predicted neurons at run time.
// Chooses a layer's neurons for a micro-batch from its attention-block input [t, d] (backend
// memory): sorted and distinct.
using FfnSelector = std::function<absl::StatusOr<std::vector<int32_t>>(int layer, const TensorView& attn_in)>;

// `ferry bench --sparsity-sim`: each token draws round(density x ffn) distinct neurons uniformly
// (a fresh draw per layer, call and token, from `seed`); the union over the tokens is fetched.
FfnSelector RandomFfnSelector(int ffn, double density, uint64_t seed);

// Wraps a selector with the measured choice to run a layer dense: each layer's first `probe`
// calls go to `inner` and their union fractions are recorded; a layer whose mean is at least
// `dense_above` then takes every neuron without asking `inner` (no predictor work, and the FFN
// over all bundles). dense_layers() reports the choice.
class AdaptiveFfnSelector {
 public:
  AdaptiveFfnSelector(FfnSelector inner, int layers, int ffn, double dense_above, int probe = 4);
  absl::StatusOr<std::vector<int32_t>> operator()(int layer, const TensorView& attn_in);
  std::vector<int> dense_layers() const;
  // Mean union fraction of a layer's probe calls (-1 before any).
  double probed_fraction(int layer) const;

 private:
  FfnSelector inner_;
  int ffn_ = 0, probe_ = 0;
  double dense_above_ = 1.0;
  std::vector<int> calls_;
  std::vector<double> sum_;
};

class SparseFfn {
 public:
  static absl::StatusOr<SparseFfn> Load(const std::string& predictor_dir, const ModelConfig& config);
  // Keeps the top k_fraction of neurons per token in predicted layers.
  void set_k_fraction(double k) { k_fraction_ = k; }
  int kept_per_token() const;  // max(1, round(k_fraction x ffn))
  // The ForwardBatch::ffn_hook that applies it: zeroes every neuron outside each token's top k.
  // Views in device memory are copied to the host and back through `backend` (evaluation with a
  // resident model on a GPU: correct, not fast; the executor's selector moves only ids).
  std::function<absl::Status(int, const TensorView&, const TensorView&)> Hook(kernels::Backend* backend = nullptr) const;
  // The ForwardBatch::ffn_select of the sparse executor: the union over the batch's tokens of each
  // token's top k_fraction neurons (every neuron in layers without a predictor). The inputs are
  // read from `backend` memory.
  FfnSelector Selector(kernels::Backend& backend) const;
  // Predicted scores [tokens, ffn] of `layer` for inputs [tokens, d].
  absl::StatusOr<std::vector<float>> Scores(int layer, const float* x, int64_t tokens) const;
  bool predicted(int layer) const { return !down_[layer].empty(); }

 private:
  int d_ = 0, ffn_ = 0, rank_ = 0;
  double k_fraction_ = 0.15;
  std::vector<std::vector<float>> down_, up_, bias_;  // per layer [rank, d], [ffn, rank], [ffn]
};

struct SparsityReport {
  std::vector<double> active_fraction;              // per layer
  std::vector<double> recall;                       // per layer at k (-1: dense / no predictor)
  std::vector<int> union_batch = {1, 4, 16, 64};
  std::vector<std::vector<double>> union_fraction;  // [layer][B]: active in >= 1 of B tokens
  std::string Table() const;
};

// From a collect directory; with `predictors` also the held-out-free recall over all tokens.
absl::StatusOr<SparsityReport> ReportSparsity(const std::string& data_dir, const SparseFfn* predictors, double k_fraction);

}  // namespace ferry::engine
