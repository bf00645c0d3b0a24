// The decoder-only transformer of every family, written once against the Backend: weights loaded
// by role from a Hugging Face checkpoint or a ferry store (matrices keep their dtype, vectors become
// fp32), resident or streamed through the offloading executor, and Forward over a packed batch of
// tokens from any mix of sequences (prefill and decode are the same call). What differs between
// families is data (ModelConfig, the family's name table) and the ops the config asks for.
// Forward moves the weight stream and the sparse FFN's cache and counters: it is not const.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/family.h"
#include "engine/gguf_model.h"
#include "engine/model_config.h"
#include "io/store.h"
#include "io/tensor_source.h"
#include "kernels/backend.h"
#include "offload/attention_cache.h"
#include "offload/ffn_bundles.h"
#include "offload/layer_streamer.h"
#include "offload/model_weights.h"
#include "offload/policy.h"

namespace ferry::engine {

using offload::Weight;
using offload::AllocWeight;
using offload::MakeView;

// Offloaded execution: the layer matrices stay in the store and stream through device memory per
// the split; everything else (embeddings, norms, biases) is resident.
struct OffloadOptions {
  offload::WeightSplit split;
  uint64_t device_budget = 0;         // bytes; 0: none
  uint64_t host_budget = 0;           // pinned bytes; 0: none
  uint64_t reserve_device_bytes = 0;  // KV cache and activations the caller will allocate
  uint64_t reserve_host_bytes = 0;    // pinned memory the caller will allocate (a KV cache on the CPU)
  offload::StreamerOptions streamer;
  // Deja Vu (ReLU FFNs): FC1 and FC2 stay out of the stream as row-column bundles
  // (offload::FfnBundles), and per layer and GPU batch only the bundles of the neurons the batch's
  // ForwardBatch::ffn_select picks cross the link. Needs a store whose attention matrices form one
  // range of the layer's region, apart from FC1/FC2.
  bool sparse_ffn = false;
  // With sparse_ffn: per layer, room for this fraction of the FFN's bundles in device memory (see
  // FfnBundles). 0: off.
  double sparse_cache_fraction = 0.0;
};

// One forward call: n tokens, each with its cache row and position.
struct ForwardBatch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> seq_ids;
  std::vector<int32_t> positions;
  std::vector<int32_t> logit_rows;  // indices into tokens whose logits are wanted, in order
  // Optional micro-batches (FlexGen's GPU batches): token indices where each ends, at sequence
  // boundaries. Each layer runs over them in turn with its weights loaded once; the temporaries
  // hold one micro-batch. Empty: one micro-batch.
  std::vector<int32_t> micro_batch_ends = {};
  // Optional hook for contextual sparsity (ReLU FFNs; the views are backend memory), called per
  // layer and micro-batch after FC1 + ReLU, before FC2, with the layer's attention-block input
  // (normalized) [t, d] and the FFN activation [t, ffn], which it may change (zero neurons).
  const std::function<absl::Status(int layer, const TensorView& attn_in, const TensorView& ffn_act)>* ffn_hook = nullptr;
  // With OffloadOptions::sparse_ffn: per layer and micro-batch, the neurons to fetch and compute
  // (sorted, distinct), chosen from the layer's attention-block input [t, d] in backend memory.
  // Unset: every neuron.
  const std::function<absl::StatusOr<std::vector<int32_t>>(int layer, const TensorView& attn_in)>* ffn_select = nullptr;
  // Optional token choice on the device: when set, the logits stay there and only each logit
  // row's chosen id comes back, into *argmax_ids (logits is left empty): the argmax (lowest index
  // among ties), or a sample (below). The banned_tokens are excluded in the logit rows listed in
  // banned_rows (EOS before min_new_tokens).
  std::vector<int32_t>* argmax_ids = nullptr;
  // With argmax_ids and sample_uniforms (one draw in [0, 1) per logit row): sample by
  // kernels/sampling.h's rule with these parameters instead of taking the argmax.
  kernels::SamplingParams sample = {};
  std::vector<double> sample_uniforms = {};
  std::vector<int32_t> banned_tokens = {};
  std::vector<int32_t> banned_rows = {};
};

// `ferry convert`: a checkpoint of a supported family into a store whose manifest records each
// tensor's role. The config is read (and refused, if ferry cannot run it) before anything is written.
// MODEL may be a GGUF file: its tensors are dequantized to `gguf.dtype` (and un-permuted), its
// metadata written as config.json, tokenizer.json and (with a chat template) tokenizer_config.json.
absl::Status ConvertModel(const std::string& model_dir, const std::string& out_dir, io::ConvertOptions options = {},
                          const GgufLoadOptions& gguf = {});

// What ConvertModel would write for MODEL (a checkpoint or a GGUF file, with gguf.quantize where
// given), without writing it: the config and the planned tensors (io::LayoutStore lays them out).
absl::StatusOr<std::pair<ModelConfig, std::vector<io::PlannedTensor>>> PlanConvertedTensors(const std::string& model_dir,
                                                                                             const GgufLoadOptions& gguf = {});

// `ferry verify`'s model check: the store holds every tensor its config.json implies, with its
// shape and a float dtype, and one region per layer (a manifest that lost a tensor is refused).
absl::Status CheckStoreModel(const io::Store& store);

// What a memory plan and the cost model need of a store's weights, from an open store or from the
// tensors a store would hold (a dummy not written, a float store planned quantized): each layer's
// region, what stays resident besides the layer matrices, and the matrices themselves.
struct WeightLayout {
  std::vector<uint64_t> layer_bytes;              // each layer's region, 4 KiB multiples
  uint64_t resident_other = 0;                    // non-layer tensors and layer vectors (as fp32)
  uint64_t largest_quantized = 0;                 // elements of the largest quantized layer matrix
  std::vector<io::PlannedTensor> layer_matrices;  // layer 0's 2-D tensors (every layer is alike)
  std::vector<io::PlannedTensor> global_matrices; // embeddings and the head
  std::optional<QuantFormat> quant;               // the layer matrices' format (nullopt: float)
  // Per layer, the attention matrices' [begin, end) in the layer's region, 4 KiB-rounded: what
  // streams when Deja Vu keeps the FFN out of the stream as bundles. Empty when a layer's FFN and
  // attention matrices interleave (then no sparse plan).
  std::vector<std::pair<uint64_t, uint64_t>> attention_ranges;
};
WeightLayout LayoutOf(const io::StoreLayout& layout);
absl::StatusOr<WeightLayout> LayoutOf(const io::Store& store);
// A store's tensors as `ferry convert --quantize` would write them (the layer matrices whose role
// IsQuantizedRole quantized to `format`; the rest as they are).
std::vector<io::PlannedTensor> PlannedTensorsOf(const io::Store& store, const std::optional<QuantFormat>& format);
// The roles ConvertModel quantizes: Q, K, V, O, gate, up, down (the streamed matrices).
bool IsQuantizedRole(const std::string& role);

class Model {
 public:
  // DIR is a Hugging Face checkpoint, a ferry store (`ferry convert`) or a GGUF file (its tensors
  // dequantized to `gguf.dtype`).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir, kernels::Backend* backend,
                                                     const GgufLoadOptions& gguf = {});
  // DIR must be a ferry store. The plan is checked against the budgets before anything is
  // allocated.
  static absl::StatusOr<std::unique_ptr<Model>> LoadOffloaded(const std::string& store_dir, kernels::Backend* backend,
                                                              const OffloadOptions& options);
  // The memory plan LoadOffloaded would make for this store on `backend` (nothing is allocated);
  // the device memory the backend holds for itself (its GEMM workspace) is counted in.
  static absl::StatusOr<offload::Plan> PlanOffload(const io::Store& store, const OffloadOptions& options,
                                                   const kernels::Backend& backend);
  // The same from a layout (sparse_ffn: the attention ranges stream, the FFN's bundles are counted
  // from layer 0's up matrix).
  static absl::StatusOr<offload::Plan> PlanOffload(const WeightLayout& layout, const OffloadOptions& options,
                                                   const kernels::Backend& backend);

  const ModelConfig& config() const { return config_; }
  kernels::Backend& backend() const { return *backend_; }
  // Bytes of weights held in backend memory.
  size_t weight_bytes() const { return weights_.resident_bytes(); }
  // The streaming pipeline of an offloaded model (nullptr when fully resident).
  const offload::LayerStreamer* streamer() const { return weights_.streamer(); }
  const offload::Plan& plan() const { return plan_; }
  // Deja Vu's bundles (nullptr unless loaded with OffloadOptions::sparse_ffn).
  const offload::FfnBundles* bundles() const { return bundles_.get(); }
  bool sparse_ffn() const { return bundles_ != nullptr; }

  // Device bytes that Forward allocates for `tokens` tokens and `logit_rows` rows of logits (an
  // upper bound, for memory plans).
  static uint64_t ForwardWorkspaceBytes(const ModelConfig& c, int64_t tokens, int64_t logit_rows, int64_t micro_tokens = 0);

  // Runs the batch; writes logits [logit_rows.size(), vocab] fp32 to host memory `logits`.
  absl::Status Forward(const ForwardBatch& batch, offload::AttentionCache& cache, std::vector<float>* logits);

 private:
  Model() = default;
  struct Scratch;
  absl::Status LoadResident(const io::TensorSource& src, bool matrices, const std::optional<QuantFormat>& quantize = std::nullopt);
  absl::StatusOr<Weight> LoadTensor(const io::TensorSource& src, const std::string& name, const std::vector<int64_t>& shape,
                                    bool as_f32, const std::optional<QuantFormat>& quantize = std::nullopt);
  absl::StatusOr<Weight> Alloc(DType dtype, std::initializer_list<int64_t> shape) const;
  absl::Status CheckBatch(const ForwardBatch& batch, std::vector<int64_t>* ends) const;
  absl::Status Embed(const Scratch& s, int64_t begin, int64_t end);
  absl::Status AttentionBlock(int layer, const offload::LayerWeights& w, const Scratch& s, int m, offload::AttentionCache& cache);
  absl::Status FfnBlock(int layer, const offload::LayerWeights& w, const Scratch& s, int m, const ForwardBatch& batch);
  absl::Status Head(const ForwardBatch& batch, const Scratch& s, std::vector<float>* logits);
  absl::Status Norm(const offload::LayerWeights& w, offload::Role gamma, offload::Role beta, const TensorView& in,
                    const TensorView& out);
  absl::Status AddNorm(const offload::LayerWeights& w, offload::Role gamma, offload::Role beta, const TensorView& residual,
                       const TensorView& delta, const TensorView& out);
  absl::Status Rotate(const Scratch& s, int m, const TensorView& x, int heads);

  ModelConfig config_;
  const Family* family_ = nullptr;
  TensorNames names_;
  kernels::Backend* backend_ = nullptr;
  offload::ModelWeights weights_;
  offload::Plan plan_;
  std::unique_ptr<offload::FfnBundles> bundles_;
};

}  // namespace ferry::engine
