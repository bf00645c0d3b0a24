// The OPT decoder written once against the Backend interface: weights loaded from a Hugging Face
// checkpoint into backend memory (matrices keep their checkpoint dtype, vectors become fp32), a
// KV cache of fixed rows, and Forward over a packed batch of tokens from any mix of sequences
// (prefill and decode are the same call). Pre-LN and post-LN (opt-350m) layouts, project_in /
// project_out, tied or explicit lm_head.
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/opt_config.h"
#include "io/store.h"
#include "io/tensor_source.h"
#include "io/uring_reader.h"
#include "kernels/backend.h"
#include "offload/attention_cache.h"
#include "offload/layer_streamer.h"
#include "offload/policy.h"

namespace ferry::engine {

// A backend tensor that owns its memory.
struct Weight {
  kernels::DeviceBuffer buffer;
  TensorView view;
};
// A contiguous tensor of `shape` in `backend` memory (uninitialized).
absl::StatusOr<Weight> AllocWeight(kernels::Backend& backend, DType dtype, std::initializer_list<int64_t> shape);

struct OptLayerWeights {
  Weight ln1_gamma, ln1_beta;  // self_attn_layer_norm
  Weight q, q_bias, k, k_bias, v, v_bias, out, out_bias;
  Weight ln2_gamma, ln2_beta;  // final_layer_norm (of the layer)
  Weight fc1, fc1_bias, fc2, fc2_bias;
};

// Offloaded execution: the layer matrices stay in the store and stream through device memory per
// the split; everything else (embeddings, LayerNorm parameters, biases) is resident.
struct OffloadOptions {
  offload::WeightSplit split;
  uint64_t device_budget = 0;         // bytes; 0: none
  uint64_t host_budget = 0;           // pinned bytes; 0: none
  uint64_t reserve_device_bytes = 0;  // KV cache and activations the caller will allocate
  uint64_t reserve_host_bytes = 0;    // pinned memory the caller will allocate (a KV cache on the CPU)
  offload::StreamerOptions streamer;
  // Deja Vu: FC1 and FC2 stay out of the stream. Each layer's FFN is kept in pinned memory as
  // row-column bundles (neuron j: FC1 row, FC1 bias, FC2 column), and per layer and GPU batch only
  // the bundles of the neurons the batch's ForwardBatch::ffn_select picks cross the link. Needs a
  // store whose attention matrices form one range of the layer's region, apart from FC1/FC2.
  bool sparse_ffn = false;
  // With sparse_ffn: per layer, room for this fraction of the FFN's bundles in device memory,
  // kept by recency over the calls (LLM in a flash's window; the often used neurons stay): a
  // selected neuron found there is copied on the device, only the others cross the link. Counted
  // in the plan. 0: off. Calls that select every neuron (prefill) bypass it.
  double sparse_cache_fraction = 0.0;
};

// The dense cache: per layer K and V of [rows, max_len, hidden] fp32 in backend memory; token t
// of row r lives at position t.
class KvCache final : public offload::AttentionCache {
 public:
  // Keys and values as kv_dtype: F32, or F16 (half the memory; attention still computes in fp32).
  static absl::StatusOr<KvCache> Create(kernels::Backend& backend, const OptConfig& config, int rows, int max_len,
                                        DType kv_dtype = DType::kF32);
  int rows() const { return rows_; }
  int max_len() const { return max_len_; }
  const TensorView& k(int layer) const { return k_[layer].view; }
  const TensorView& v(int layer) const { return v_[layer].view; }

  absl::Status Check(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions) const override;
  absl::Status Attend(kernels::Backend& backend, const offload::AttendArgs& args) override;

 private:
  int rows_ = 0;
  int max_len_ = 0;
  std::vector<Weight> k_, v_;
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
  // Optional hook for contextual sparsity (CPU backend: the views are host memory), called per
  // layer and micro-batch after FC1 + ReLU, before FC2, with the layer's attention-block input
  // (LayerNorm'd) [t, d] and the FFN activation [t, ffn], which it may change (zero neurons).
  const std::function<absl::Status(int layer, const TensorView& attn_in, const TensorView& ffn_act)>* ffn_hook = nullptr;
  // Optional token choice on the device: when set, the logits stay there and only each logit
  // row's chosen id comes back, into *argmax_ids (logits is left empty): the argmax (lowest index
  // among ties), or a sample (below).
  // Token banned_token (>= 0) is excluded in the logit rows listed in banned_rows (EOS before
  // min_new_tokens).
  // With OffloadOptions::sparse_ffn: per layer and micro-batch, the neurons to fetch and compute
  // (sorted, distinct), chosen from the layer's attention-block input (LayerNorm'd) [t, d] in
  // backend memory. Unset: every neuron.
  const std::function<absl::StatusOr<std::vector<int32_t>>(int layer, const TensorView& attn_in)>* ffn_select = nullptr;
  std::vector<int32_t>* argmax_ids = nullptr;
  // With argmax_ids and sample_uniforms (one draw in [0, 1) per logit row): sample by
  // kernels/sampling.h's rule with these parameters instead of taking the argmax.
  kernels::SamplingParams sample = {};
  std::vector<double> sample_uniforms = {};
  int32_t banned_token = -1;
  std::vector<int32_t> banned_rows = {};
};

class OptModel {
 public:
  // DIR is a Hugging Face checkpoint or a ferry store (`ferry convert`).
  static absl::StatusOr<std::unique_ptr<OptModel>> Load(const std::string& dir, kernels::Backend* backend);

  const OptConfig& config() const { return config_; }
  kernels::Backend& backend() const { return *backend_; }
  // Bytes of weights held in backend memory.
  size_t weight_bytes() const { return weight_bytes_; }

  // DIR must be a ferry store. The plan is checked against the budgets before anything is
  // allocated.
  static absl::StatusOr<std::unique_ptr<OptModel>> LoadOffloaded(const std::string& store_dir, kernels::Backend* backend,
                                                                 const OffloadOptions& options);
  // The memory plan LoadOffloaded would make for this store on `backend` (nothing is allocated);
  // the device memory the backend holds for itself (its GEMM workspace) is counted in.
  static absl::StatusOr<offload::Plan> PlanOffload(const io::Store& store, const OffloadOptions& options,
                                                   const kernels::Backend& backend);
  // The streaming pipeline of an offloaded model (nullptr when fully resident).
  const offload::LayerStreamer* streamer() const { return streamer_.get(); }
  const offload::Plan& plan() const { return plan_; }
  bool sparse_ffn() const { return sparse_; }
  // Sparse FFN: bytes of one neuron's bundle, and the bundle bytes moved to the backend so far.
  uint64_t bundle_bytes() const { return bundle_bytes_; }
  uint64_t bundle_bytes_moved() const { return bundle_bytes_moved_; }
  // Disk tier: the bundle pages read from the SSD so far (page-rounded).
  uint64_t bundle_disk_bytes_read() const { return bundle_disk_bytes_read_; }
  // The device-side bundle cache (OffloadOptions::sparse_cache_fraction): rows per layer, and the
  // selected neurons found there / fetched over the link so far.
  int64_t bundle_cache_rows() const { return cache_rows_; }
  uint64_t bundle_cache_hits() const { return cache_hits_; }
  uint64_t bundle_cache_misses() const { return cache_misses_; }

  // Device bytes that Forward allocates for `tokens` tokens and `logit_rows` rows of logits (an
  // upper bound, for memory plans), and that a KV cache of rows x max_len takes.
  static uint64_t ForwardWorkspaceBytes(const OptConfig& c, int64_t tokens, int64_t logit_rows, int64_t micro_tokens = 0);
  static uint64_t KvCacheBytes(const OptConfig& c, int64_t rows, int64_t max_len, DType kv_dtype = DType::kF32);

  // Runs the batch; writes logits [logit_rows.size(), vocab] fp32 to host memory `logits`.
  absl::Status Forward(const ForwardBatch& batch, offload::AttentionCache& cache, std::vector<float>* logits) const;

 private:
  OptModel() = default;
  struct LayerViews;
  absl::Status LoadGlobals(const io::TensorSource& src, const std::string& prefix);
  absl::Status LoadLayerVectors(const io::TensorSource& src, const std::string& p, OptLayerWeights* L);
  absl::StatusOr<LayerViews> Views(int layer) const;
  absl::Status ReleaseLayer(int layer) const;
  absl::StatusOr<Weight> LoadTensor(const io::TensorSource& ckpt, const std::string& name,
                                    const std::vector<int64_t>& shape, bool as_f32);
  absl::StatusOr<Weight> Alloc(DType dtype, std::initializer_list<int64_t> shape) const;

  OptConfig config_;
  kernels::Backend* backend_ = nullptr;
  size_t weight_bytes_ = 0;
  Weight embed_tokens_, embed_positions_, final_ln_gamma_, final_ln_beta_;
  Weight project_in_, project_out_, lm_head_;
  bool has_lm_head_ = false;
  std::vector<OptLayerWeights> layers_;
  // Offloaded: byte offsets of q, k, v, out, fc1, fc2 within each layer's block, and the pipeline.
  std::vector<std::array<uint64_t, 6>> matrix_offsets_;
  DType matrix_dtype_ = DType::kF16;
  offload::Plan plan_;
  std::unique_ptr<offload::LayerStreamer> streamer_;
  // Sparse FFN (OffloadOptions::sparse_ffn).
  bool sparse_ = false;
  std::vector<uint64_t> stream_begin_;             // per layer: where the streamed range starts in its region
  std::vector<kernels::DeviceBuffer> bundles_;     // per layer, pinned: [ffn, 2d + 1] in the matrices' dtype
  kernels::DeviceBuffer gather_;                   // backend memory for one layer's fetched bundles
  int64_t bundle_stride_ = 0;  // elements per bundle row (2d + 1, padded to 16 bytes)
  uint64_t bundle_bytes_ = 0;
  mutable uint64_t bundle_bytes_moved_ = 0;
  // Disk tier: the bundles in the store's ffn_bundles.bin, read page-wise into a pinned staging
  // mirror of one layer's region.
  uint64_t layer_stride_ = 0;
  io::ReadFile bundle_file_;
  kernels::DeviceBuffer staging_;
  std::unique_ptr<io::UringReader> bundle_reader_;
  mutable std::unique_ptr<kernels::Fence> staging_fence_;
  mutable uint64_t bundle_disk_bytes_read_ = 0;
  // Per layer: cache_rows_ bundles in device memory, which neuron each slot holds (-1: none), the
  // slot of each neuron (-1: not cached), and the call that last used each slot.
  struct BundleCache {
    kernels::DeviceBuffer rows;
    std::vector<int32_t> neuron_of, slot_of;
    std::vector<uint64_t> last_used;
    // Gives `neurons` (not cached) the least recently used slots not used at `now`, as many as
    // there are; returns the slots, in the order of the neurons that got them.
    std::vector<int32_t> Admit(const std::vector<int32_t>& neurons, uint64_t now);
  };
  // Disk tier: reads the pages holding `neurons`' bundles of `layer` into staging_.
  absl::Status ReadBundlePages(int layer, const std::vector<int32_t>& neurons) const;
  int64_t cache_rows_ = 0;
  mutable std::vector<BundleCache> caches_;
  mutable uint64_t cache_clock_ = 0, cache_hits_ = 0, cache_misses_ = 0;
  absl::StatusOr<TensorView> GatherBundles(int layer, const std::vector<int32_t>& neurons) const;
  absl::Status LoadBundles(const io::Store& store, const std::string& prefix, const OffloadOptions& options);
  absl::Status BuildLayerBundles(const io::Store& store, const std::string& prefix, int layer, char* dst) const;
};

}  // namespace ferry::engine
