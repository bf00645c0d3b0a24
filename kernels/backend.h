// The Backend interface: memory, copies and every op of the model's layer program, on tensor
// views. The model is written once against it; the CPU backend is the reference and every other
// backend's op has a test against its CPU twin. Activations are fp32; weights may be F32, F16 or
// BF16. Ops validate shapes and dtypes and return kInvalidArgument on a mismatch.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "base/tensor.h"
#include "kernels/sampling.h"

namespace ferry::kernels {

class Backend;

// Memory owned by a backend (device memory, or host staging memory when `host`); freed through
// it. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* owner, void* data, size_t bytes, bool host = false)
      : owner_(owner), data_(data), bytes_(bytes), host_(host) {}
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void Release();
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  bool host_ = false;
};

// A point in a backend's compute queue: Wait() blocks the calling thread until all work queued
// before the fence was recorded has finished.
class Fence {
 public:
  virtual ~Fence() = default;
  virtual absl::Status Wait() = 0;
};

struct GatherRowsArgs {
  TensorView table;  // [rows, dim] F32/F16/BF16
  TensorView ids;    // [n] I32; row ids[i] + offset is gathered
  int offset = 0;    // OPT's learned positions start at row 2
  TensorView out;    // [n, dim] F32
};

struct LayerNormArgs {
  TensorView in;     // [n, dim] F32
  TensorView gamma;  // [dim] F32
  TensorView beta;   // [dim] F32
  TensorView out;    // [n, dim] F32 (may alias in)
  float eps = 1e-5f;
};

// The residual add fused with the LayerNorm after it: residual += delta, then
// out = LayerNorm(residual) (out may alias residual).
struct AddLayerNormArgs {
  TensorView residual;  // [n, dim] F32, updated
  TensorView delta;     // [n, dim] F32
  TensorView gamma;     // [dim] F32
  TensorView beta;      // [dim] F32
  TensorView out;       // [n, dim] F32
  float eps = 1e-5f;
};

// RMSNorm (Llama's): out = x / sqrt(mean(x^2) + eps) * gamma, per row. Any row width: the
// per-head q/k norm of Qwen3 runs on a [n * heads, head_dim] view.
struct RmsNormArgs {
  TensorView in;     // [n, dim] F32
  TensorView gamma;  // [dim] F32
  TensorView out;    // [n, dim] F32 (may alias in)
  float eps = 1e-6f;
};

// residual += delta, then out = RmsNorm(residual) (out may alias residual).
struct AddRmsNormArgs {
  TensorView residual;  // [n, dim] F32, updated
  TensorView delta;     // [n, dim] F32
  TensorView gamma;     // [dim] F32
  TensorView out;       // [n, dim] F32
  float eps = 1e-6f;
};

// Rotary position embedding in place, as transformers computes it (the half-split layout): in
// each head, dim d < rotary_dim / 2 pairs with d + rotary_dim / 2; with angle = position x
// inv_freq[d] (one fp32 product), cos and sin times attention_scaling, x[d] = x[d] cos - x[d +
// half] sin and x[d + half] = x[d + half] cos + x[d] sin. Dims past rotary_dim are left alone
// (partial rotary).
struct RopeArgs {
  TensorView x;          // [n, heads * head_dim] F32, rotated in place
  TensorView positions;  // [n] I32
  TensorView inv_freq;   // [tables, rotary_dim / 2] F32
  TensorView freq_rows;  // optional [n] I32: the inv_freq row of each token (data == nullptr: row 0)
  int num_heads = 1;
  int rotary_dim = 0;    // even, <= head_dim
  float attention_scaling = 1.0f;
};

// SwiGLU's activation: out = silu(gate) * up, silu(x) = x / (1 + exp(-x)).
struct SiluMulArgs {
  TensorView gate;  // [n, f] F32
  TensorView up;    // [n, f] F32
  TensorView out;   // [n, f] F32 (may alias gate or up)
};

struct LinearArgs {
  TensorView in;      // [n, k] F32
  TensorView weight;  // [m, k] F32/F16/BF16 (PyTorch's layout)
  TensorView bias;    // [m] F32, or data == nullptr for none
  TensorView out;     // [n, m] F32, must not alias in
  bool relu = false;  // apply ReLU after the bias
};

// Writes new keys/values into the per-sequence cache rows.
struct KvWriteArgs {
  TensorView k;          // [n, kv_heads * head_dim] F32
  TensorView v;          // [n, kv_heads * head_dim] F32
  TensorView k_cache;    // [seqs, max_len, kv_heads * head_dim] F32, or F16 (rounded to nearest)
  TensorView v_cache;    // [seqs, max_len, kv_heads * head_dim] F32 or F16
  TensorView seq_ids;    // [n] I32: cache row of each token
  TensorView positions;  // [n] I32: slot of each token in its row
};

// Causal attention over the cache: query i attends to entries 0..positions[i] of row seq_ids[i].
// Serves prefill (many queries per sequence) and decode (one per sequence) alike. Grouped-query
// attention is native: query head h reads KV head h / (heads / kv_heads); K and V are never
// repeated. head_dim = q width / heads.
struct AttentionArgs {
  TensorView q;          // [n, heads * head_dim] F32
  TensorView k_cache;    // [seqs, max_len, kv_heads * head_dim] F32 or F16 (scores and sums in fp32)
  TensorView v_cache;    // [seqs, max_len, kv_heads * head_dim] F32 or F16
  TensorView seq_ids;    // [n] I32
  TensorView positions;  // [n] I32
  TensorView out;        // [n, heads * head_dim] F32
  int num_heads = 1;
  float scale = 1.0f;    // applied to q.k
  // Optional (data == nullptr: off): col_sums[seq, head, j] += the probability each query of the
  // call gave to cache entry j, computed in the same pass (H2O's prefill scores), per query head.
  // Must be zeroed by the caller; [seqs, heads, max_len] F32.
  TensorView col_sums;
  // Optional host copies of seq_ids and positions (n each), which let a backend plan its launch
  // (the CUDA backend runs runs of >= 16 consecutive positions of one sequence as tensor-core tiles).
  const int32_t* host_seq_ids = nullptr;
  const int32_t* host_positions = nullptr;
  int num_kv_heads = 0;  // 0: num_heads (multi-head attention)
  int kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
};

// Training ops (Deja Vu's predictors, trained where the model runs), all F32 row-major.
// MatMul: out[M, N] = op(a) op(b) (+ bias[N] on every row), op(x) = x or x^T. Exact fp32 math on
// every backend (no TF32, no 16-bit rounding).
struct MatMulArgs {
  TensorView a;        // [M, K], or [K, M] with trans_a
  TensorView b;        // [K, N], or [N, K] with trans_b
  TensorView out;      // [M, N]; must not alias a or b
  bool trans_a = false, trans_b = false;
  TensorView bias;     // optional [N]: out = bias + op(a) op(b)
};

// The gradient of the class-balanced binary cross-entropy over logits z [B, F] with bit-packed
// labels [B, ceil(F / 8)] U8 (label j of row i: bit j % 8 of byte j / 8), averaged over the B rows:
// grad = (label ? w_pos (sigmoid(z) - 1) : w_neg sigmoid(z)) / B, and grad_bias[j] = sum_i grad[i, j].
struct BceGradArgs {
  TensorView z;          // [B, F] F32
  TensorView labels;     // [B, ceil(F / 8)] U8
  TensorView grad;       // [B, F] F32, out
  TensorView grad_bias;  // [F] F32, out
  float w_pos = 1.0f, w_neg = 1.0f;
};

// One Adam step in place: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// w -= lr (m / c1) / (sqrt(v / c2) + eps), with the bias corrections c1 = 1 - b1^t, c2 = 1 - b2^t
// given by the caller (so every backend uses the same ones).
struct AdamArgs {
  TensorView w, g, m, v;  // [n] F32 each (any shape, contiguous, equal sizes)
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, c1 = 1.0f, c2 = 1.0f;
};

// Sampling where the logits are (so only token ids come back), by the rule of kernels/sampling.h,
// with the caller's uniform draw per row (each sequence's own random stream stays on the host).
struct SampleRowsArgs {
  TensorView logits;                 // [rows, vocab] F32
  const double* uniforms = nullptr;  // host memory: rows draws in [0, 1)
  SamplingParams params;
  TensorView ids;                    // [rows] I32, out
};

// H2O's per-KV-head slot cache: each (sequence, KV head) owns `slots` entries that hold whichever
// tokens survived eviction; positions are absolute (rotary keys are rotated before they are
// stored, so attention needs no position ids).
struct SlotKvWriteArgs {
  TensorView k;          // [n, kv_heads * head_dim] F32 or F16
  TensorView v;          // [n, kv_heads * head_dim] F32 or F16
  TensorView k_slots;    // [seqs, kv_heads, slots, head_dim] F32 or F16 (converted on the way in)
  TensorView v_slots;    // [seqs, kv_heads, slots, head_dim] F32 or F16
  TensorView seq_ids;    // [n] I32
  TensorView slot_ids;   // [n, kv_heads] I32: the slot each KV head of each token goes to (-1: not stored)
};

// One query per row over the occupied slots of its (sequence, KV head), returning each slot's
// attention probability per query head from the same pass (0 for empty slots). Query head h reads
// KV head h / (heads / kv_heads).
struct SlotAttentionArgs {
  TensorView q;          // [n, heads * head_dim] F32
  TensorView k_slots;    // [seqs, kv_heads, slots, head_dim] F32 or F16
  TensorView v_slots;    // [seqs, kv_heads, slots, head_dim] F32 or F16
  TensorView occupied;   // [seqs, kv_heads, slots] U8 (1: holds a token)
  TensorView seq_ids;    // [n] I32
  TensorView out;        // [n, heads * head_dim] F32
  TensorView probs;      // [n, heads, slots] F32
  float scale = 1.0f;
};

// H2O's bookkeeping over the per-(sequence, KV head) slot state, run where the slots live (no host
// round trip per step). State tensors are [seqs, kv_heads, slots]: slot_pos I32 (the absolute
// position a slot holds, -1: empty), scores F32 (accumulated attention), occupied U8.
// Place: each token's heads take the first free slot of their (sequence, head); the slot gets the
// token's position, score 0, occupied 1, and slot_ids[i, h] says which (-1 where none was free,
// which the eviction rule never lets happen).
struct H2OPlaceArgs {
  TensorView seq_ids;    // [n] I32
  TensorView positions;  // [n] I32
  TensorView slot_pos, scores, occupied;
  TensorView slot_ids;   // [n, heads] I32, out
};
// Update after SlotAttention: every occupied slot's score grows by its probability summed over the
// query heads of its group (in head order; probs has heads = group x kv_heads); where more
// than `budget` slots are occupied, the lowest-scoring one that is neither recent (position >
// positions[i] - recent) nor protected (position < protect) is emptied (ties: the oldest).
struct H2OUpdateArgs {
  TensorView seq_ids;    // [n] I32
  TensorView positions;  // [n] I32
  TensorView probs;      // [n, heads, slots] F32
  TensorView slot_pos, scores, occupied;  // [seqs, kv_heads, slots]
  int budget = 0, recent = 0, protect = 0;
};

// H2O's prefill selection, per (prompt, KV head), from the prompt's column sums summed over the
// query heads of the group (in head order): keep the `recent`
// newest positions, the first `protect`, and the heavy - min(protect, length) highest column sums
// of the rest (ties: the oldest); the kept positions fill slots 0.. in position order (score: the
// column sum) and the row's other slots are emptied. token_slot says for each prompt token and
// head which slot it goes to (-1: dropped), ready for SlotKvWrite.
struct H2OPrefillArgs {
  TensorView col_sums;    // [used, heads, max_len] F32 (query heads; a multiple of kv_heads)
  TensorView lengths;     // [used] I32: each prompt's length (<= max_len)
  TensorView rows;        // [used] I32: each prompt's cache row
  TensorView slot_pos, scores, occupied;  // [seqs, kv_heads, slots]
  TensorView token_slot;  // [used * max_len, kv_heads] I32, out (token u * max_len + p)
  int heavy = 0, recent = 0, protect = 0;
};

// The FFN over selected neurons only (Deja Vu), from row-column bundles: neuron j's bundle is
// [FC1 row j (d values) | FC1 bias j | FC2 column j (d values)], so one read fetches a neuron.
// out = FC2 bias + sum over bundles of relu(x . row + bias) * column. Bundles of a q4/q8 model
// are quantized rows (base/quant.h's BundleQuantLayout), dequantized inside the op with fp32 math.
struct BundledFfnArgs {
  TensorView x;         // [n, d] F32
  // [m, stride] F32/F16/BF16, stride >= 2d + 1 (padding after the FC2 column ignored); or, with
  // quant set, [m, LayoutQuantBundle(quant, d).bytes] U8.
  TensorView bundles;
  TensorView fc2_bias;  // [d] F32 (data == nullptr: none)
  TensorView out;       // [n, d] F32, must not alias x
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  virtual absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;
  // Waits for all work queued on this backend.
  virtual absl::Status Synchronize() = 0;

  // Host memory for staging transfers (page-locked on CUDA, so copies run at link speed), counted
  // against the backend's host budget.
  virtual absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) = 0;
  // Copies on the transfer queue, callable from another thread: they return when the copy is
  // done and do not wait for queued compute work (CUDA: a second stream).
  virtual absl::Status TransferToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status TransferWithinDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::StatusOr<std::unique_ptr<Fence>> RecordFence() = 0;

  virtual absl::Status GatherRows(const GatherRowsArgs& args) = 0;
  virtual absl::Status LayerNorm(const LayerNormArgs& args) = 0;
  virtual absl::Status AddLayerNorm(const AddLayerNormArgs& args) = 0;
  virtual absl::Status Linear(const LinearArgs& args) = 0;
  virtual absl::Status RmsNorm(const RmsNormArgs& args) = 0;
  virtual absl::Status AddRmsNorm(const AddRmsNormArgs& args) = 0;
  virtual absl::Status Rope(const RopeArgs& args) = 0;
  virtual absl::Status SiluMul(const SiluMulArgs& args) = 0;
  // dst = src, same shape and dtype, both contiguous, on the compute queue.
  virtual absl::Status CopyTensor(const TensorView& src, const TensorView& dst) = 0;
  // out = a + b, elementwise, [n, dim] F32 (out may alias a or b).
  virtual absl::Status Add(const TensorView& a, const TensorView& b, const TensorView& out) = 0;
  virtual absl::Status KvWrite(const KvWriteArgs& args) = 0;
  virtual absl::Status Attention(const AttentionArgs& args) = 0;
  virtual absl::Status BundledFfn(const BundledFfnArgs& args) = 0;
  // ids[r] = index of the largest of logits[r, :] (the lowest index among ties): greedy decoding
  // without bringing the logits back. logits [rows, vocab] F32, ids [rows] I32.
  virtual absl::Status ArgMaxRows(const TensorView& logits, const TensorView& ids) = 0;
  virtual absl::Status SampleRows(const SampleRowsArgs& args) = 0;
  virtual absl::Status SlotKvWrite(const SlotKvWriteArgs& args) = 0;
  virtual absl::Status SlotAttention(const SlotAttentionArgs& args) = 0;
  virtual absl::Status H2OPlace(const H2OPlaceArgs& args) = 0;
  virtual absl::Status H2OUpdate(const H2OUpdateArgs& args) = 0;
  virtual absl::Status H2OPrefill(const H2OPrefillArgs& args) = 0;
  // dst row i = host_table row rows[i] (row_bytes each; host_table is pinned memory from
  // AllocateHost), in order with the compute queued after it. The CUDA backend reads the pinned
  // table from a kernel: one launch however scattered the rows (Deja Vu's neuron bundles).
  virtual absl::Status GatherHostRows(const void* host_table, size_t row_bytes, const std::vector<int32_t>& rows, void* dst) = 0;
  // dst row dst_rows[i] = src row src_rows[i] (row_bytes each), in order with the compute queued
  // after it; src and dst are backend memory or pinned host memory (Deja Vu's device-side cache of
  // neuron bundles: hits copied from it, fetched rows copied into it).
  virtual absl::Status CopyRows(const void* src, void* dst, size_t row_bytes, const std::vector<int32_t>& src_rows,
                                const std::vector<int32_t>& dst_rows) = 0;
  virtual absl::Status MatMul(const MatMulArgs& args) = 0;
  virtual absl::Status BceGrad(const BceGradArgs& args) = 0;
  virtual absl::Status AdamStep(const AdamArgs& args) = 0;
  // Device memory the backend holds for itself from creation on (the CUDA backend's GEMM
  // workspace), inside its budget: plans leave it out of what the model may use.
  virtual size_t reserved_device_bytes() const { return 0; }

 protected:
  friend class DeviceBuffer;
  virtual void Free(void* data, size_t bytes, bool host) = 0;
};

// Shape and dtype checks shared by every backend, so that each reports bad arguments alike.
absl::Status ValidateGatherRows(const GatherRowsArgs& args);
absl::Status ValidateLayerNorm(const LayerNormArgs& args);
absl::Status ValidateAddLayerNorm(const AddLayerNormArgs& args);
absl::Status ValidateLinear(const LinearArgs& args);
absl::Status ValidateRmsNorm(const RmsNormArgs& args);
absl::Status ValidateAddRmsNorm(const AddRmsNormArgs& args);
absl::Status ValidateRope(const RopeArgs& args);
absl::Status ValidateSiluMul(const SiluMulArgs& args);
absl::Status ValidateCopy(const TensorView& src, const TensorView& dst);
absl::Status ValidateAdd(const TensorView& a, const TensorView& b, const TensorView& out);
absl::Status ValidateKvWrite(const KvWriteArgs& args);
absl::Status ValidateAttention(const AttentionArgs& args);
// A quantized Linear with at most this many input rows runs a fused dequantize-GEMV kernel on the
// GPU; above it the matrix is dequantized to fp16 in device memory (rows x cols x 2 bytes, which
// memory plans reserve) and multiplied by the fp16 GEMM.
inline constexpr int64_t kFusedQuantRows = 16;

// A q8/q4 KV cache tensor (quant set, dtype U8, logical shape [..., cols]) is a quantized matrix
// of numel / cols rows: its layout. Only for tensors the Validate functions accepted.
QuantLayout KvQuantLayout(const TensorView& t);

absl::Status ValidateBundledFfn(const BundledFfnArgs& args);
absl::Status ValidateArgMaxRows(const TensorView& logits, const TensorView& ids);
absl::Status ValidateSampleRows(const SampleRowsArgs& args);
absl::Status ValidateSlotKvWrite(const SlotKvWriteArgs& args);
absl::Status ValidateSlotAttention(const SlotAttentionArgs& args);
absl::Status ValidateH2OPlace(const H2OPlaceArgs& args);
absl::Status ValidateH2OUpdate(const H2OUpdateArgs& args);
absl::Status ValidateH2OPrefill(const H2OPrefillArgs& args);
absl::Status ValidateMatMul(const MatMulArgs& args);
absl::Status ValidateBceGrad(const BceGradArgs& args);
absl::Status ValidateAdam(const AdamArgs& args);

}  // namespace ferry::kernels
