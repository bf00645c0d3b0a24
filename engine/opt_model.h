// The OPT decoder written once against the Backend interface: weights loaded from a Hugging Face
// checkpoint into backend memory (matrices keep their checkpoint dtype, vectors become fp32), a
// KV cache of fixed rows, and Forward over a packed batch of tokens from any mix of sequences
// (prefill and decode are the same call). Pre-LN and post-LN (opt-350m) layouts, project_in /
// project_out, tied or explicit lm_head.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/opt_config.h"
#include "io/tensor_source.h"
#include "kernels/backend.h"

namespace ferry::engine {

// A backend tensor that owns its memory.
struct Weight {
  kernels::DeviceBuffer buffer;
  TensorView view;
};

struct OptLayerWeights {
  Weight ln1_gamma, ln1_beta;  // self_attn_layer_norm
  Weight q, q_bias, k, k_bias, v, v_bias, out, out_bias;
  Weight ln2_gamma, ln2_beta;  // final_layer_norm (of the layer)
  Weight fc1, fc1_bias, fc2, fc2_bias;
};

// Per-layer K and V: [rows, max_len, hidden] fp32 in backend memory.
class KvCache {
 public:
  static absl::StatusOr<KvCache> Create(kernels::Backend& backend, const OptConfig& config, int rows, int max_len);
  int rows() const { return rows_; }
  int max_len() const { return max_len_; }
  const TensorView& k(int layer) const { return k_[layer].view; }
  const TensorView& v(int layer) const { return v_[layer].view; }

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
};

class OptModel {
 public:
  // DIR is a Hugging Face checkpoint or a ferry store (`ferry convert`).
  static absl::StatusOr<std::unique_ptr<OptModel>> Load(const std::string& dir, kernels::Backend* backend);

  const OptConfig& config() const { return config_; }
  kernels::Backend& backend() const { return *backend_; }
  // Bytes of weights held in backend memory.
  size_t weight_bytes() const { return weight_bytes_; }

  // Runs the batch; writes logits [logit_rows.size(), vocab] fp32 to host memory `logits`.
  absl::Status Forward(const ForwardBatch& batch, KvCache& cache, std::vector<float>* logits) const;

 private:
  OptModel() = default;
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
};

}  // namespace ferry::engine
