// The cost model of the zig-zag schedule (issue 16): from a probe of the machine (`ferry probe`),
// a model's config and weight layout, a policy and a workload, the predicted time of each stage of
// a layer (disk read and its XXH3 check, host->device copy, compute: linears, attention, small
// ops; with Deja Vu the fetch of the chosen neurons' bundles, which the forward waits for, and the
// FFN over them), per phase (prefill, decode), and how they overlap: a streamed layer costs its slowest
// stage on a GPU (copy engine, SMs and the disk work apart), and its compute plus the slower of
// disk and copy on the CPU stand-in (the compute shares the cores and the memory bus with the copy,
// and the virtual disk needs the cores too); a resident layer costs its compute; the head (final
// norm, lm_head, logits to the host) follows the layers. Memory comes from the plan code that loading uses (Model::PlanOffload with the KV
// cache and workspace reserves of PolicyOffload), so a plan the model says fits does fit.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/quant.h"
#include "engine/model.h"
#include "engine/model_config.h"
#include "io/uring_reader.h"
#include "nlohmann/json.hpp"
#include "offload/h2o_cache.h"
#include "offload/kv_cache.h"
#include "offload/policy.h"

namespace ferry::engine {

// What a user picks by hand today: weights placement, batch shape, KV placement and type, H2O,
// and the layer matrices' format (which must be the store's to run).
struct Policy {
  offload::WeightSplit split;
  int gpu_batch_size = 1, num_gpu_batches = 1;
  bool kv_on_cpu = false;
  KvType kv_dtype = DType::kF32;
  std::optional<offload::H2OOptions> h2o;
  std::optional<QuantFormat> weights;  // nullopt: float (as stored)
  // Deja Vu (ReLU FFNs): the fraction of the FFN's neurons each token keeps (0: dense), and the
  // fraction of each layer's bundles cached on the device.
  double sparsity = 0.0, sparsity_cache = 0.0;
  int batch() const { return gpu_batch_size * num_gpu_batches; }
  // The flags that run it: "--weights 0,100,0 --gpu-batch-size 32 --num-gpu-batches 2 --kv gpu ...";
  // sparsity as --sparsity-k (with trained predictors: --sparsity DIR), or on a dummy --sparsity-sim.
  std::string Flags(bool dummy = false) const;
};

struct Workload {
  int prompt_len = 512;
  int gen_len = 32;
  int64_t num_prompts = 0;  // 0: one batch (throughput of one round)
};

// The KV cache and OffloadOptions (budgets and reserves: the KV cache and the forward workspace)
// of a policy; RunBench and the planner use these, so the planner's memory is the run's.
offload::KvCacheSpec PolicyKvSpec(const ModelConfig& c, const Policy& p, const Workload& w);
OffloadOptions PolicyOffload(const ModelConfig& c, const Policy& p, const Workload& w, uint64_t device_budget, uint64_t host_budget);

struct StageTimes {
  double disk = 0, copy = 0, compute = 0;  // per layer, seconds (compute over every GPU batch)
  double attention = 0;                    // of compute: attention (on the host with --kv cpu)
  double layer = 0;                        // what the layer costs in the schedule
};

struct Prediction {
  double prefill_s = 0, step_s = 0, round_s = 0;  // a round: one batch's prefill + gen_len - 1 steps
  double throughput_tok_s = 0;                    // num_prompts (or one batch) x gen_len over the rounds
  StageTimes prefill_layer, decode_layer;
  double prefill_head_s = 0, decode_head_s = 0;
  std::string bound;  // what bounds a decode step: "disk", "pinned->device", "compute"
  uint64_t disk_bytes_per_step = 0, h2d_bytes_per_step = 0;  // Deja Vu's bundles included
  double ffn_union = 0;  // Deja Vu: the fraction of each layer's bundles a decode step fetches per GPU batch
  uint64_t device_bytes = 0, host_bytes = 0;      // the plan's
  double floor_step_s = 0;                         // bytes per step over the probed link rates
  nlohmann::json ToJson() const;
};

class CostModel {
 public:
  // Every rate the model reads is checked (present, finite, positive): a probe that lacks one is
  // refused in one line naming it (measure again: ferry probe --reprobe).
  static absl::StatusOr<CostModel> FromProbe(const nlohmann::json& probe);

  // Rates, interpolated from the probe (piecewise linear in log size; clamped at the ends).
  double H2DBytesPerSecond(uint64_t chunk) const;
  double D2HBytesPerSecond(uint64_t chunk) const;
  double D2DBytesPerSecond(uint64_t chunk) const;
  double DiskBytesPerSecond(uint64_t block, unsigned depth) const;  // 0: not probed
  // Scattered 4 KiB page reads (Deja Vu's bundles on disk); the smallest block's rate when the
  // probe has no page reads; 0: no disk probed.
  double DiskPageBytesPerSecond() const;
  // A Linear of rows x in -> out with weights of `type` (F32, F16/BF16, or a quantized format):
  // the probe's time at its shape scaled by out x in, piecewise linear in rows, linear above.
  double LinearSeconds(int64_t rows, int64_t out, int64_t in, DType dtype, const std::optional<QuantFormat>& quant) const;
  double AttentionSeconds(uint64_t kv_bytes, const KvType& type, bool on_host) const;
  // Causal attention over one prompt of `tokens` (tokens x (tokens + 1) / 2 query-key pairs per
  // head): the probe's cost per pair, linear in head_dim between its points, the narrowest point's
  // cost per pair below it, the widest point's FLOP rate above it (and everywhere when the probe
  // has one point, as probes before v9).
  double PrefillAttentionSeconds(int64_t heads, int64_t head_dim, int64_t tokens) const;
  // Deja Vu's FFN over m gathered neurons of width d for `rows` rows, the gather from pinned memory
  // included, from the probe's bundled-FFN points (per neuron-dimension, interpolated in log m and
  // linearly in rows, extended above the last); nullopt when the probe has none. Bundles "F16"
  // (F32/BF16 scaled by their bytes) or "q4"/"q8" (the q4 points).
  std::optional<double> BundledFfnSeconds(int64_t rows, int64_t m, int64_t d, DType dtype, const std::optional<QuantFormat>& quant) const;
  int64_t BundledFfnRows() const;  // the most rows the probe timed the bundled FFN at (0: none)
  double op_seconds() const { return op_seconds_; }
  // One small op over `rows` rows (the issue of a norm, add or activation: a launch or the CPU pool's
  // dispatch), from the probe's points by rows; op_seconds without them.
  double OpSeconds(int64_t rows) const;
  bool shared_cores() const { return shared_cores_; }
  bool has_disk() const { return !disk_.empty(); }

  // The plan must be Model::PlanOffload's for PolicyOffload(config, policy, workload).
  absl::StatusOr<Prediction> Predict(const ModelConfig& c, const WeightLayout& layout, const Policy& p, const Workload& w,
                                     const offload::Plan& plan, const io::UringOptions& uring = {}) const;

 private:
  struct Point {
    double x, y;
  };
  static double Interpolate(const std::vector<Point>& pts, double x);  // in log x
  static void NoCheaperWithMoreRows(std::vector<Point>& pts);  // points by rows: a point dearer than one at more rows takes its time
  std::vector<Point> h2d_, d2h_, d2d_;
  struct DiskPoint {
    uint64_t block;
    unsigned depth;
    double rate;
  };
  std::vector<DiskPoint> disk_;
  double disk_pages_ = 0;
  // Per weight type ("F32", "F16", "q8", "q4") and matrix size (out x in elements): (rows,
  // seconds per weight element).
  std::map<std::string, std::map<double, std::vector<Point>>> linear_;
  static double PerElement(const std::vector<Point>& pts, double rows);
  std::map<std::string, double> attention_, host_attention_;  // KV type name -> bytes/s
  // Bundle type ("F16", "q4") -> rows -> (neurons, seconds per neuron-dimension).
  std::map<std::string, std::map<double, std::vector<Point>>> bundled_;
  std::vector<Point> prefill_attention_;  // (head_dim, seconds per query-key pair per head), by head_dim
  std::vector<Point> ops_;  // (rows, seconds per small op)
  double op_seconds_ = 0, hash_rate_ = 0;
  bool shared_cores_ = false;
};

}  // namespace ferry::engine
