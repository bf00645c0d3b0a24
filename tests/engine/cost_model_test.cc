// The cost model's arithmetic on a synthetic probe (every rate known, so each stage can be
// recomputed by hand), its refusal of probes that lack a rate, the planner's layouts (equal to
// the stores that convert writes), and that the plans it chooses fit: they load and get their KV
// cache under the budgets they were chosen for.
#include "engine/cost_model.h"

#include <cmath>
#include <tuple>

#include "engine/dummy_model.h"
#include "engine/model.h"
#include "engine/planner.h"
#include "gtest/gtest.h"
#include "io/store.h"
#include "kernels/registry.h"
#include "offload/kv_cache.h"
#include "test_util.h"

namespace ferry::engine {
namespace {

using nlohmann::json;

constexpr double kH2D = 10e9, kD2H = 8e9, kD2D = 100e9, kDisk = 2e9, kHash = 20e9, kOp = 2e-6;
constexpr double kF16PerElem = 1e-10, kF32PerElem = 2e-10;  // seconds per weight element at one row
constexpr double kAttention = 50e9, kPrefillFlops = 100e9;

// Rates constant in chunk size, linears with per-element times that double from 16 to 256 rows
// per 16x rows (so the interpolation is checkable), one disk point.
json SyntheticProbe(const std::string& backend) {
  json copies = {{"host_to_device", json::array()}, {"device_to_host", json::array()}, {"within_device", json::array()}};
  for (uint64_t chunk : {uint64_t{1} << 20, uint64_t{64} << 20}) {
    copies["host_to_device"].push_back({{"chunk_bytes", chunk}, {"GBps", kH2D * 1e-9}});
    copies["device_to_host"].push_back({{"chunk_bytes", chunk}, {"GBps", kD2H * 1e-9}});
    copies["within_device"].push_back({{"chunk_bytes", chunk}, {"GBps", kD2D * 1e-9}});
  }
  json linear = json::array();
  for (int64_t size : {512, 4096}) {
    for (const auto& [type, per] : {std::pair{"F32", kF32PerElem}, std::pair{"F16", kF16PerElem}}) {
      for (const auto& [rows, factor] : {std::pair{1, 1.0}, std::pair{16, 1.0}, std::pair{256, 2.0}}) {
        const double seconds = per * factor * size * size;
        linear.push_back({{"rows", rows}, {"out", size}, {"in", size}, {"weights", type},
                          {"GFLOPs", 2.0 * rows * size * size / seconds * 1e-9}});
      }
    }
  }
  json attention = json::array({{{"kv_dtype", "F32"}, {"rows", 8}, {"positions", 1024}, {"kv_GBps", kAttention * 1e-9}},
                                {{"kv_dtype", "F16"}, {"rows", 8}, {"positions", 1024}, {"kv_GBps", kAttention * 0.5e-9}}});
  return {{"format", "ferry-probe"}, {"version", 5}, {"host", "test"}, {"backend", backend},
          {"options", {{"quick", false}}}, {"copies", copies},
          {"disk", {{"reads", json::array({{{"block_bytes", 1 << 20}, {"queue_depth", 16}, {"GBps", kDisk * 1e-9}}})}}},
          {"linear", linear}, {"attention", attention}, {"host_attention", attention},
          {"prefill_attention", json::array({{{"kv_dtype", "F32"}, {"tokens", 256}, {"GFLOPs", kPrefillFlops * 1e-9}}})},
          {"op_seconds", kOp}, {"hash_GBps", kHash * 1e-9}};
}

struct Dummy {
  ModelConfig config;
  WeightLayout layout;
};

Dummy LoadDummy(const std::string& name, const std::optional<QuantFormat>& q = std::nullopt) {
  Dummy d;
  auto shape = FindDummyShape(name);
  EXPECT_TRUE(shape.ok());
  d.config = *ModelConfig::FromJson(DummyConfigJson(*shape), name);
  auto planned = DummyPlannedTensors(*shape, q);
  EXPECT_TRUE(planned.ok());
  auto layout = io::LayoutStore(*planned);
  EXPECT_TRUE(layout.ok());
  d.layout = LayoutOf(*layout);
  return d;
}

TEST(CostModelTest, InterpolatesTheProbesRates) {
  auto m = CostModel::FromProbe(SyntheticProbe("cuda"));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_DOUBLE_EQ(m->H2DBytesPerSecond(4 << 20), kH2D);
  EXPECT_DOUBLE_EQ(m->DiskBytesPerSecond(1 << 20, 16), kDisk);
  // At a probed size: 1 and 16 rows cost the same per element, 256 twice as much, in between
  // linear in rows, above 256 in proportion to the rows.
  EXPECT_NEAR(m->LinearSeconds(1, 512, 512, DType::kF16, std::nullopt), kF16PerElem * 512 * 512, 1e-15);
  EXPECT_NEAR(m->LinearSeconds(136, 512, 512, DType::kF16, std::nullopt), 1.5 * kF16PerElem * 512 * 512, 1e-15);
  EXPECT_NEAR(m->LinearSeconds(1024, 512, 512, DType::kF32, std::nullopt), 8 * kF32PerElem * 512 * 512, 1e-14);
  // Between sizes (equal per-element times here) and beyond them: the per-element time holds.
  EXPECT_NEAR(m->LinearSeconds(1, 3000, 700, DType::kF16, std::nullopt), kF16PerElem * 3000 * 700, 1e-15);
  EXPECT_NEAR(m->LinearSeconds(1, 8192, 8192, DType::kBF16, std::nullopt), kF16PerElem * 8192.0 * 8192, 1e-12);
  // A type the probe lacks (q4) falls back to F16's rate rather than failing.
  EXPECT_GT(m->LinearSeconds(1, 512, 512, DType::kU8, QuantFormat{QuantKind::kQ4, 64}), 0.0);
  EXPECT_DOUBLE_EQ(m->AttentionSeconds(1000000, DType::kF16, false), 1e6 / (kAttention * 0.5));
}

// Small ops by rows (probe v8): interpolated linearly between the probed rows, the one-row cost
// below, the largest row count's above (more rows add bytes, which the elementwise passes count);
// a probe without the points costs every op op_seconds. A decode step's ops are priced at its GPU
// batch's rows: with ops dear at 16 rows, the 16-row step costs more per layer than the 1-row one by
// at least the ops' difference.
TEST(CostModelTest, SmallOpsCostTheirRows) {
  json probe = SyntheticProbe("cpu");
  auto flat = CostModel::FromProbe(probe);
  ASSERT_TRUE(flat.ok());
  EXPECT_DOUBLE_EQ(flat->OpSeconds(1), kOp);
  EXPECT_DOUBLE_EQ(flat->OpSeconds(4096), kOp);
  probe["ops"] = json::array({{{"rows", 16}, {"seconds", 12e-6}}, {{"rows", 1}, {"seconds", 1e-6}}});  // any order
  auto m = CostModel::FromProbe(probe);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_DOUBLE_EQ(m->OpSeconds(1), 1e-6);
  EXPECT_NEAR(m->OpSeconds(6), 1e-6 + 5.0 / 15 * 11e-6, 1e-15);
  EXPECT_DOUBLE_EQ(m->OpSeconds(16), 12e-6);
  EXPECT_DOUBLE_EQ(m->OpSeconds(100000), 12e-6);
  probe["ops"][0]["seconds"] = -1.0;
  EXPECT_FALSE(CostModel::FromProbe(probe).ok());  // a negative time is refused, never used
  probe["ops"][0] = {{"rows", 16}, {"seconds", 12e-6}};

  Dummy d = LoadDummy("opt-125m");
  auto cpu = kernels::CreateBackend({});
  ASSERT_TRUE(cpu.ok());
  const Workload w{32, 9, 0};
  auto step_layer = [&](const CostModel& cm, int rows) {
    Policy p;
    p.split = {100, 0, 0};
    p.gpu_batch_size = rows;
    auto plan = Model::PlanOffload(d.layout, PolicyOffload(d.config, p, w, 0, 0), **cpu);
    EXPECT_TRUE(plan.ok());
    auto pred = cm.Predict(d.config, d.layout, p, w, *plan);
    EXPECT_TRUE(pred.ok());
    return pred.ok() ? pred->decode_layer.compute : 0.0;
  };
  const double with_ops = step_layer(*m, 16) - step_layer(*m, 1), without = step_layer(*flat, 16) - step_layer(*flat, 1);
  EXPECT_GT(with_ops - without, 8 * 11e-6 * 0.99);  // at least 8 ops a layer, each 11 us dearer at 16 rows
}

TEST(CostModelTest, StagesAndOverlapAreTheScheduleArithmetic) {
  Dummy d = LoadDummy("opt-125m");
  const Workload w{32, 9, 0};
  for (const std::string backend : {"cuda", "cpu"}) {
    auto m = CostModel::FromProbe(SyntheticProbe(backend));
    ASSERT_TRUE(m.ok());
    auto cpu = kernels::CreateBackend({});
    ASSERT_TRUE(cpu.ok());
    Policy p;
    p.split = {20, 30, 50};
    p.gpu_batch_size = 4;
    p.num_gpu_batches = 2;
    auto plan = Model::PlanOffload(d.layout, PolicyOffload(d.config, p, w, 0, 0), **cpu);
    ASSERT_TRUE(plan.ok()) << plan.status();
    auto pred = m->Predict(d.config, d.layout, p, w, *plan);
    ASSERT_TRUE(pred.ok()) << pred.status();
    const offload::LayerPlacement& l = plan->layers[0];
    // Disk: read and XXH3 check of the disk part; copy: everything not resident over the link
    // plus the resident prefix within the device.
    EXPECT_NEAR(pred->decode_layer.disk, l.disk_bytes() / kDisk + l.disk_bytes() / kHash, 1e-12);
    EXPECT_NEAR(pred->decode_layer.copy, (l.cpu_bytes() + l.disk_bytes()) / kH2D + l.gpu_end / kD2D, 1e-12);
    // Decode compute: per GPU batch of 4 rows every layer matrix at F16's one-row rate, the
    // attention over the mean context (32 + 9/2 = 36 positions) of fp32 keys and values.
    double linears = 0;
    for (const auto& t : d.layout.layer_matrices) linears += kF16PerElem * t.shape[0] * t.shape[1];
    const double attention = 2.0 * 4 * 36 * d.config.kv_width() * 4 / kAttention;
    EXPECT_NEAR(pred->decode_layer.attention, 2 * attention, 1e-12);
    EXPECT_GT(pred->decode_layer.compute, 2 * (linears + attention));
    EXPECT_LT(pred->decode_layer.compute, 2 * (linears + attention) * 1.5);
    // The overlap: a GPU overlaps all three stages; on the CPU stand-in the compute does not overlap
    // the copy, and the disk stage progresses beside the compute at half its rate, the rest after.
    const StageTimes& st = pred->decode_layer;
    const double expect_layer = backend == "cuda" ? std::max({st.disk, st.copy, st.compute})
                                                  : st.compute + std::max(st.copy, std::max(0.0, st.disk - 0.5 * st.compute));
    EXPECT_NEAR(st.layer, expect_layer, 1e-12);
    if (backend == "cpu") {  // between full overlap and none
      EXPECT_GT(st.layer, std::max({st.disk, st.copy + st.compute}));
      EXPECT_LT(st.layer, st.compute + std::max(st.disk, st.copy));
    }
    EXPECT_NEAR(pred->step_s, d.config.num_layers * expect_layer + pred->decode_head_s, 1e-9);
    EXPECT_NEAR(pred->round_s, pred->prefill_s + 8 * pred->step_s, 1e-9);
    EXPECT_NEAR(pred->throughput_tok_s, 8 * 9 / pred->round_s, 1e-9);
    EXPECT_EQ(pred->bound, "disk");  // 50% of each layer from a 2 GB/s disk
    EXPECT_EQ(pred->h2d_bytes_per_step, d.config.num_layers * (l.cpu_bytes() + l.disk_bytes()));
    // Rounds: 20 prompts in batches of 8 are 3 rounds.
    Workload w20 = w;
    w20.num_prompts = 20;
    auto p20 = m->Predict(d.config, d.layout, p, w20, *plan);
    ASSERT_TRUE(p20.ok());
    EXPECT_NEAR(p20->throughput_tok_s, 20.0 * 9 / (3 * p20->round_s), 1e-9);
    // Resident weights: no link, compute-bound, and each layer costs its compute.
    Policy r = p;
    r.split = {100, 0, 0};
    auto rplan = Model::PlanOffload(d.layout, PolicyOffload(d.config, r, w, 0, 0), **cpu);
    ASSERT_TRUE(rplan.ok());
    auto rp = m->Predict(d.config, d.layout, r, w, *rplan);
    ASSERT_TRUE(rp.ok());
    EXPECT_EQ(rp->bound, "compute");
    EXPECT_EQ(rp->h2d_bytes_per_step, 0u);
    EXPECT_NEAR(rp->decode_layer.layer, rp->decode_layer.compute, 1e-15);
    EXPECT_LT(rp->step_s, pred->step_s);
  }
}

// A call over more rows does all the work of one over fewer: a probe point dearer than the one at
// more rows (timed in a slow phase of the machine) takes the cheaper time: linears, small ops and
// the bundled FFN; points that already grow with the rows are kept as probed.
TEST(CostModelTest, APointDearerThanOneAtMoreRowsTakesItsTime) {
  json probe = SyntheticProbe("cpu");
  for (json& e : probe["linear"]) {
    if (e["rows"] == 1 && e["out"] == 512 && e["weights"] == "F16") e["GFLOPs"] = e["GFLOPs"].get<double>() / 3;  // 3x dearer
  }
  probe["ops"] = json::array({{{"rows", 1}, {"seconds", 20e-6}}, {{"rows", 16}, {"seconds", 12e-6}}});
  probe["bundled_ffn"] = json::array();
  for (const auto& [rows, m, seconds] : {std::tuple{1, 256, 2e-3}, std::tuple{1, 2048, 2e-3}, std::tuple{16, 256, 1e-3}, std::tuple{16, 2048, 4e-3}}) {
    probe["bundled_ffn"].push_back({{"bundles", "F16"}, {"rows", rows}, {"neurons", m}, {"d", 1024}, {"seconds", seconds}});
  }
  auto m = CostModel::FromProbe(probe);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_NEAR(m->LinearSeconds(1, 512, 512, DType::kF16, std::nullopt), kF16PerElem * 512 * 512, 1e-15);  // the 16-row time
  EXPECT_NEAR(m->LinearSeconds(1, 4096, 4096, DType::kF16, std::nullopt), kF16PerElem * 4096 * 4096, 1e-15);
  EXPECT_DOUBLE_EQ(m->OpSeconds(1), 12e-6);
  EXPECT_DOUBLE_EQ(m->OpSeconds(16), 12e-6);
  // 256 neurons: 1 row dearer than 16 -> 16's; 2048: 1 row cheaper, kept.
  EXPECT_NEAR(*m->BundledFfnSeconds(1, 256, 1024, DType::kF16, std::nullopt), 1e-3, 1e-12);
  EXPECT_NEAR(*m->BundledFfnSeconds(16, 256, 1024, DType::kF16, std::nullopt), 1e-3, 1e-12);
  EXPECT_NEAR(*m->BundledFfnSeconds(1, 2048, 1024, DType::kF16, std::nullopt), 2e-3, 1e-12);
  EXPECT_NEAR(*m->BundledFfnSeconds(16, 2048, 1024, DType::kF16, std::nullopt), 4e-3, 1e-12);
}

// A quantized KV cache's decode attention reads its bytes per position over many positions: a
// single row's layout is padded to 4 KiB (5.3x a q8 row of opt-125m's 768 values).
TEST(CostModelTest, QuantizedKvAttentionReadsItsBytesPerPosition) {
  Dummy d = LoadDummy("opt-125m");
  const Workload w{32, 9, 0};
  json probe = SyntheticProbe("cpu");
  probe["attention"].push_back({{"kv_dtype", "q8g64"}, {"rows", 8}, {"positions", 1024}, {"kv_GBps", 2.0}});
  auto m = CostModel::FromProbe(probe);
  ASSERT_TRUE(m.ok()) << m.status();
  auto cpu = kernels::CreateBackend({});
  ASSERT_TRUE(cpu.ok());
  Policy p;
  p.split = {100, 0, 0};
  p.gpu_batch_size = 8;
  p.kv_dtype = *ParseKvType("q8", d.config.head_dim());
  auto plan = Model::PlanOffload(d.layout, PolicyOffload(d.config, p, w, 0, 0), **cpu);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto pred = m->Predict(d.config, d.layout, p, w, *plan);
  ASSERT_TRUE(pred.ok()) << pred.status();
  // Keys and values of 8 rows x 36 positions, 768 int8 values and 12 fp16 scales each.
  const double per_position = 768 + 12 * 2;
  EXPECT_NEAR(pred->decode_layer.attention, 2.0 * 8 * 36 * per_position / 2e9, 1e-3 * pred->decode_layer.attention);
}

// Prefill attention costs per query-key pair: one probe point (before v9) scales its FLOP rate to
// any head_dim; two points (v9: head_dim 128 and 32) give a per-pair cost linear in head_dim between
// them, the narrow point's cost below it (what does not scale with head_dim), the wide one's FLOP
// rate above it.
TEST(CostModelTest, PrefillAttentionInterpolatesTheHeadDims) {
  const double pairs = 64.0 * 65 / 2;  // 64 causal tokens
  auto one = CostModel::FromProbe(SyntheticProbe("cpu"));
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_NEAR(one->PrefillAttentionSeconds(8, 32, 64), 8 * pairs * 4 * 32 / kPrefillFlops, 1e-15);
  EXPECT_NEAR(one->PrefillAttentionSeconds(32, 128, 64), 32 * pairs * 4 * 128 / kPrefillFlops, 1e-15);
  json probe = SyntheticProbe("cpu");
  // head_dim 32 at half head_dim 128's FLOP rate: a pair costs half as much at 32 as at 128.
  const double wide = 4.0 * 128 / kPrefillFlops, narrow = 4.0 * 32 / (kPrefillFlops / 2);  // per pair
  probe["prefill_attention"] = json::array({{{"kv_dtype", "F32"}, {"tokens", 256}, {"head_dim", 32}, {"GFLOPs", kPrefillFlops / 2 * 1e-9}},
                                            {{"kv_dtype", "F32"}, {"tokens", 256}, {"head_dim", 128}, {"GFLOPs", kPrefillFlops * 1e-9}}});
  auto two = CostModel::FromProbe(probe);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_NEAR(two->PrefillAttentionSeconds(1, 128, 64), pairs * wide, 1e-15);
  EXPECT_NEAR(two->PrefillAttentionSeconds(1, 32, 64), pairs * narrow, 1e-15);
  EXPECT_NEAR(two->PrefillAttentionSeconds(1, 64, 64), pairs * (narrow + (wide - narrow) / 3), 1e-15);
  EXPECT_NEAR(two->PrefillAttentionSeconds(1, 16, 64), pairs * narrow, 1e-15);
  EXPECT_NEAR(two->PrefillAttentionSeconds(1, 256, 64), pairs * 2 * wide, 1e-15);
  EXPECT_NEAR(two->PrefillAttentionSeconds(12, 64, 64), 12 * two->PrefillAttentionSeconds(1, 64, 64), 1e-15);
  // A narrow point that costs more per pair than the wide one (a slow phase): the wide one takes it.
  probe["prefill_attention"][0]["GFLOPs"] = kPrefillFlops * 1e-9 / 16;
  auto slow = CostModel::FromProbe(probe);
  ASSERT_TRUE(slow.ok()) << slow.status();
  const double slow_narrow = 4.0 * 32 / (kPrefillFlops / 16);  // 2 x wide per pair
  EXPECT_NEAR(slow->PrefillAttentionSeconds(1, 128, 64), pairs * slow_narrow, 1e-15);
  EXPECT_NEAR(slow->PrefillAttentionSeconds(1, 64, 64), pairs * slow_narrow, 1e-15);
  probe["prefill_attention"][0]["head_dim"] = "wide";
  EXPECT_FALSE(CostModel::FromProbe(probe).ok());
}

TEST(CostModelTest, RefusesAProbeThatLacksARate) {
  EXPECT_TRUE(CostModel::FromProbe(SyntheticProbe("cpu")).ok());
  for (const std::string key : {"op_seconds", "hash_GBps", "prefill_attention", "linear", "copies"}) {
    json j = SyntheticProbe("cpu");
    j.erase(key);
    auto m = CostModel::FromProbe(j);
    ASSERT_FALSE(m.ok()) << key;
    EXPECT_NE(std::string(m.status().message()).find("--reprobe"), std::string::npos) << m.status();
  }
  json bad = SyntheticProbe("cpu");
  bad["copies"]["host_to_device"][0]["GBps"] = -1.0;
  EXPECT_FALSE(CostModel::FromProbe(bad).ok());
  bad = SyntheticProbe("cpu");
  bad["linear"][0]["rows"] = "many";
  EXPECT_FALSE(CostModel::FromProbe(bad).ok());
  bad = SyntheticProbe("cpu");
  bad["options"]["quick"] = true;
  auto q = CostModel::FromProbe(bad);
  ASSERT_FALSE(q.ok());
  EXPECT_NE(std::string(q.status().message()).find("quick"), std::string::npos);
  EXPECT_FALSE(CostModel::FromProbe(json::parse("[1, 2]")).ok());
  // A policy on the disk tier needs disk rates.
  bad = SyntheticProbe("cpu");
  bad.erase("disk");
  auto m = CostModel::FromProbe(bad);
  ASSERT_TRUE(m.ok());
  Dummy d = LoadDummy("opt-125m");
  Policy p;
  p.split = {0, 0, 100};
  auto cpu = kernels::CreateBackend({});
  auto plan = Model::PlanOffload(d.layout, PolicyOffload(d.config, p, {32, 8, 0}, 0, 0), **cpu);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(m->Predict(d.config, d.layout, p, {32, 8, 0}, *plan).ok());
}

// The planner sizes stores before they exist: the layout of a store's tensors (as they are, or
// quantized as convert would write them) is the layout of the store convert writes.
TEST(PlannerTest, LayoutsAreTheStoresConvertWrites) {
  ferry::testing::TempDir f32_dir, q4_dir;
  ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), f32_dir.path()).ok());
  GgufLoadOptions q;
  q.quantize = QuantFormat{QuantKind::kQ4, 64};
  ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), q4_dir.path(), {}, q).ok());
  auto f32 = io::Store::Open(f32_dir.path());
  auto q4 = io::Store::Open(q4_dir.path());
  ASSERT_TRUE(f32.ok() && q4.ok());
  auto own = LayoutOf(*f32);
  auto q4_own = LayoutOf(*q4);
  ASSERT_TRUE(own.ok() && q4_own.ok());
  auto same = io::LayoutStore(PlannedTensorsOf(*f32, std::nullopt));
  auto as_q4 = io::LayoutStore(PlannedTensorsOf(*f32, QuantFormat{QuantKind::kQ4, 64}));
  ASSERT_TRUE(same.ok() && as_q4.ok());
  EXPECT_EQ(LayoutOf(*same).layer_bytes, own->layer_bytes);
  EXPECT_EQ(LayoutOf(*same).resident_other, own->resident_other);
  EXPECT_EQ(same->data_bytes, f32->data_bytes());
  EXPECT_EQ(LayoutOf(*as_q4).layer_bytes, q4_own->layer_bytes);
  EXPECT_EQ(LayoutOf(*as_q4).largest_quantized, q4_own->largest_quantized);
  EXPECT_EQ(as_q4->data_bytes, q4->data_bytes());
  EXPECT_LT(q4_own->layer_bytes[0] * 3, own->layer_bytes[0]);
  // And from the checkpoint itself, not converted: the same layouts (float and q4).
  ModelConfig config;
  auto from_ckpt = LayoutsOfCheckpoint(ferry::testing::ModelDir(), *ParseAllowance("q4", 32), &config);
  ASSERT_TRUE(from_ckpt.ok()) << from_ckpt.status();
  ASSERT_EQ(from_ckpt->size(), 2u);
  EXPECT_EQ(config.num_layers, 6);
  EXPECT_FALSE((*from_ckpt)[0].first.has_value());
  EXPECT_EQ((*from_ckpt)[0].second.layer_bytes, own->layer_bytes);
  EXPECT_EQ((*from_ckpt)[0].second.resident_other, own->resident_other);
  EXPECT_EQ((*from_ckpt)[1].second.layer_bytes, q4_own->layer_bytes);
  // The store-based plan equals the layout-based one.
  auto cpu = kernels::CreateBackend({});
  OffloadOptions o;
  o.split = {10, 40, 50};
  o.reserve_device_bytes = 12345;
  auto a = Model::PlanOffload(*f32, o, **cpu);
  auto b = Model::PlanOffload(*own, o, **cpu);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->device_bytes, b->device_bytes);
  EXPECT_EQ(a->host_bytes, b->host_bytes);
}

TEST(PlannerTest, AllowanceParsesAndRefuses) {
  auto exact = ParseAllowance("exact", 64);
  ASSERT_TRUE(exact.ok());
  EXPECT_EQ(exact->Describe(), "exact");
  auto a = ParseAllowance("q4,kv-f16,kv-q8,h2o=0.2", 64);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->weights.size(), 1u);
  EXPECT_EQ(a->kv_dtypes.size(), 3u);
  EXPECT_DOUBLE_EQ(a->h2o, 0.2);
  for (const std::string bad : {"q3", "h2o=2", "h2o=x", "kv-q2", "h2o=0"}) {
    auto r = ParseAllowance(bad, 64);
    EXPECT_FALSE(r.ok()) << bad;
  }
}

// A GPU budget halfway between what one sequence needs with every weight streamed and with every
// weight resident.
uint64_t HalfwayBudget(const PlanRequest& r, const kernels::Backend& backend) {
  Policy p;
  p.split = {0, 100, 0};
  const uint64_t streamed = Model::PlanOffload(r.layouts[0].second, PolicyOffload(r.config, p, r.workload, 0, 0), backend)->device_bytes;
  p.split = {100, 0, 0};
  const uint64_t resident = Model::PlanOffload(r.layouts[0].second, PolicyOffload(r.config, p, r.workload, 0, 0), backend)->device_bytes;
  EXPECT_LT(streamed, resident);
  return (streamed + resident) / 2;
}

// Chosen plans fit: the top candidates for tiny-opt under a GPU budget smaller than its weights
// load offloaded and get their KV cache on a backend that enforces that budget.
TEST(PlannerTest, ChosenPlansFitTheirBudgets) {
  ferry::testing::TempDir dir;
  ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), dir.path()).ok());
  auto store = io::Store::Open(dir.path());
  ASSERT_TRUE(store.ok());
  auto m = CostModel::FromProbe(SyntheticProbe("cpu"));
  ASSERT_TRUE(m.ok());
  PlanRequest r;
  r.config = *ModelConfig::FromModelDir(dir.path());
  auto allow = ParseAllowance("kv-f16,h2o=0.25", r.config.head_dim());
  ASSERT_TRUE(allow.ok());
  r.allow = *allow;
  auto layouts = LayoutsOfStore(*store, r.allow);
  ASSERT_TRUE(layouts.ok());
  r.layouts = *layouts;
  r.workload = {32, 8, 0};
  r.host_budget = 64 << 20;
  r.max_batch = 64;
  auto cpu = kernels::CreateBackend({});
  r.device_budget = HalfwayBudget(r, **cpu);
  auto cs = SearchPolicies(r, *m, **cpu);
  ASSERT_TRUE(cs.ok()) << cs.status();
  ASSERT_GE(cs->size(), 3u);
  bool some_h2o = false, some_f16 = false, some_streamed = false;
  for (const Candidate& c : *cs) {
    EXPECT_LE(c.plan.device_bytes, r.device_budget);
    EXPECT_LE(c.plan.host_bytes, r.host_budget);
    some_h2o |= c.policy.h2o.has_value();
    some_f16 |= c.policy.kv_dtype == KvType(DType::kF16);
    some_streamed |= c.policy.split.gpu < 100;
  }
  EXPECT_TRUE(some_h2o && some_f16 && some_streamed);
  for (size_t i = 1; i < cs->size(); ++i) EXPECT_GE((*cs)[i - 1].prediction.throughput_tok_s, (*cs)[i].prediction.throughput_tok_s);
  for (size_t i = 0; i < 3; ++i) {
    const Policy& p = (*cs)[i].policy;
    kernels::BackendOptions bo;
    bo.memory_budget_bytes = r.device_budget;
    bo.host_budget_bytes = r.host_budget;
    auto backend = kernels::CreateBackend(bo);
    ASSERT_TRUE(backend.ok());
    OffloadOptions o = PolicyOffload(r.config, p, r.workload, r.device_budget, r.host_budget);
    auto model = Model::LoadOffloaded(dir.path(), backend->get(), o);
    ASSERT_TRUE(model.ok()) << p.Flags() << ": " << model.status();
    auto cache = offload::CreateKvCache(**backend, PolicyKvSpec(r.config, p, r.workload));
    ASSERT_TRUE(cache.ok()) << p.Flags() << ": " << cache.status();
  }
  // Exact by default: f32 KV, the full cache, the store's weights.
  r.allow = Allowance();
  auto layouts_exact = LayoutsOfStore(*store, r.allow);
  r.layouts = *layouts_exact;
  auto exact = SearchPolicies(r, *m, **cpu);
  ASSERT_TRUE(exact.ok());
  for (const Candidate& c : *exact) {
    EXPECT_EQ(c.policy.kv_dtype, KvType(DType::kF32));
    EXPECT_FALSE(c.policy.h2o.has_value());
    EXPECT_FALSE(c.policy.weights.has_value());
    EXPECT_TRUE(c.runnable);
  }
  // No budget: everything resident is the fastest placement.
  r.device_budget = r.host_budget = 0;
  auto free = SearchPolicies(r, *m, **cpu);
  ASSERT_TRUE(free.ok());
  EXPECT_DOUBLE_EQ(free->front().policy.split.gpu, 100.0);
  // A budget nothing fits is one clear error.
  r.device_budget = 1 << 20;
  auto none = SearchPolicies(r, *m, **cpu);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("no policy fits"), std::string::npos) << none.status();
}

// Deja Vu in the model: per GPU batch the union of its rows' neurons (independent draws: 1 -
// (1 - k)^rows; 0.9 or more runs dense) crosses the link as bundles, only the attention part
// streams, and the FFN over the union costs the probe's bundled-FFN time per neuron-dimension
// (interpolated in rows); at batch 1 on a link-bound split it beats the dense FFN.
TEST(CostModelTest, SparsePoliciesCountTheUnionAndTheBundles) {
  Dummy d = LoadDummy("opt-125m");
  const Workload w{32, 9, 0};
  constexpr double kBundle1 = 4e-10, kBundle16 = 1e-9;  // seconds per neuron-dimension at 1 and 16 rows
  json probe = SyntheticProbe("cuda");
  for (int rows : {1, 16}) {
    for (int m : {256, 2048}) {
      probe["bundled_ffn"].push_back({{"bundles", "F16"}, {"rows", rows}, {"neurons", m}, {"d", 1024},
                                      {"seconds", (rows == 1 ? kBundle1 : kBundle16) * m * 1024}});
    }
  }
  auto m = CostModel::FromProbe(probe);
  auto fallback = CostModel::FromProbe(SyntheticProbe("cuda"));
  ASSERT_TRUE(m.ok() && fallback.ok()) << m.status();
  EXPECT_NEAR(*m->BundledFfnSeconds(4, 1000, 768, DType::kF16, std::nullopt), (kBundle1 + 3.0 / 15 * (kBundle16 - kBundle1)) * 1000 * 768,
              1e-12);
  EXPECT_FALSE(fallback->BundledFfnSeconds(4, 1000, 768, DType::kF16, std::nullopt).has_value());
  EXPECT_EQ(m->BundledFfnRows(), 16);
  EXPECT_EQ(fallback->BundledFfnRows(), 0);
  // Bundles on disk are scattered pages: the probe's page rate, else its smallest block's.
  EXPECT_DOUBLE_EQ(fallback->DiskPageBytesPerSecond(), kDisk);
  json paged = probe;
  paged["disk"]["pages"] = {{"page_bytes", 4096}, {"queue_depth", 16}, {"GBps", 0.25}};
  auto pm = CostModel::FromProbe(paged);
  ASSERT_TRUE(pm.ok()) << pm.status();
  EXPECT_DOUBLE_EQ(pm->DiskPageBytesPerSecond(), 0.25e9);
  paged["disk"]["pages"]["GBps"] = -1;
  EXPECT_FALSE(CostModel::FromProbe(paged).ok());
  auto cpu = kernels::CreateBackend({});
  ASSERT_TRUE(cpu.ok());
  Policy dense;
  dense.split = {0, 100, 0};
  dense.gpu_batch_size = 4;
  dense.num_gpu_batches = 2;
  Policy sparse = dense;
  sparse.sparsity = 0.15;
  auto dplan = Model::PlanOffload(d.layout, PolicyOffload(d.config, dense, w, 0, 0), **cpu);
  auto splan = Model::PlanOffload(d.layout, PolicyOffload(d.config, sparse, w, 0, 0), **cpu);
  ASSERT_TRUE(dplan.ok() && splan.ok()) << splan.status();
  // Only the attention part streams: Q, K, V, O of 768^2 F16 (4.5 MiB) of each 13.5 MiB layer.
  ASSERT_EQ(splan->layers.size(), dplan->layers.size());
  EXPECT_EQ(splan->layers[0].bytes, uint64_t{4} * 768 * 768 * 2);
  EXPECT_GT(splan->host_bytes, splan->layers[0].bytes * 12);  // every layer's bundles pinned
  auto pd = m->Predict(d.config, d.layout, dense, w, *dplan);
  auto ps = m->Predict(d.config, d.layout, sparse, w, *splan);
  ASSERT_TRUE(pd.ok() && ps.ok()) << ps.status();
  const double u = 1.0 - std::pow(0.85, 4);
  EXPECT_NEAR(ps->ffn_union, u, 1e-12);
  EXPECT_DOUBLE_EQ(pd->ffn_union, 0.0);
  const uint64_t bundle = offload::FfnBundles::BundleBytes(768, DType::kF16);
  const uint64_t per_batch = static_cast<uint64_t>(u * 3072 * static_cast<double>(bundle));
  EXPECT_EQ(ps->h2d_bytes_per_step, 12 * (splan->layers[0].bytes + 2 * per_batch));
  // The FFN part of the decode compute: per GPU batch the gather + FFN at the probe's rate for 4
  // rows over the union's neurons, replacing the dense linears of up and down.
  const double ffn_s = *m->BundledFfnSeconds(4, std::llround(u * 3072), 768, DType::kF16, std::nullopt);
  double dense_ffn = 0;
  for (const auto& t : d.layout.layer_matrices) {
    if (t.role == "ffn_up" || t.role == "ffn_down") dense_ffn += m->LinearSeconds(4, t.shape[0], t.shape[1], t.dtype, t.quant);
  }
  EXPECT_GT(dense_ffn, 0.0);
  EXPECT_NEAR(ps->decode_layer.compute - pd->decode_layer.compute, 2 * (ffn_s - dense_ffn), 1e-9);
  // At one row the union is k: fewer bytes than the dense layers, a faster step on this link.
  Policy one = sparse;
  one.gpu_batch_size = 1;
  one.num_gpu_batches = 1;
  Policy one_dense = dense;
  one_dense.gpu_batch_size = 1;
  one_dense.num_gpu_batches = 1;
  auto p1 = m->Predict(d.config, d.layout, one, w, *Model::PlanOffload(d.layout, PolicyOffload(d.config, one, w, 0, 0), **cpu));
  auto p1d = m->Predict(d.config, d.layout, one_dense, w, *Model::PlanOffload(d.layout, PolicyOffload(d.config, one_dense, w, 0, 0), **cpu));
  ASSERT_TRUE(p1.ok() && p1d.ok());
  EXPECT_NEAR(p1->ffn_union, 0.15, 1e-12);
  EXPECT_LT(p1->h2d_bytes_per_step * 2, p1d->h2d_bytes_per_step);
  EXPECT_LT(p1->step_s, p1d->step_s);
  // The prefill gathers every bundle and runs the FFN over all of them (past the probe's 16 rows:
  // the points' trend where it is dearer than the GEMM over the bundles): with the weights resident
  // (no stream to save), never cheaper than the dense prefill, by at least the gather.
  Policy resident = sparse, resident_dense = dense;
  resident.split = resident_dense.split = {100, 0, 0};
  auto pr = m->Predict(d.config, d.layout, resident, w, *Model::PlanOffload(d.layout, PolicyOffload(d.config, resident, w, 0, 0), **cpu));
  auto prd = m->Predict(d.config, d.layout, resident_dense, w,
                        *Model::PlanOffload(d.layout, PolicyOffload(d.config, resident_dense, w, 0, 0), **cpu));
  ASSERT_TRUE(pr.ok() && prd.ok()) << pr.status();
  const double gather_all = 3072.0 * static_cast<double>(bundle) / kH2D;
  EXPECT_GT(pr->prefill_s - prd->prefill_s, 12 * 2 * gather_all * 0.99);
  // A batch whose union reaches 0.9 runs dense over every bundle.
  Policy wide = sparse;
  wide.gpu_batch_size = 32;
  auto pw = m->Predict(d.config, d.layout, wide, w, *Model::PlanOffload(d.layout, PolicyOffload(d.config, wide, w, 0, 0), **cpu));
  ASSERT_TRUE(pw.ok());
  EXPECT_DOUBLE_EQ(pw->ffn_union, 1.0);
  // Without the probe's bundled points: the linears and the copy, a prediction all the same.
  auto pf = fallback->Predict(d.config, d.layout, sparse, w, *splan);
  ASSERT_TRUE(pf.ok());
  EXPECT_NE(pf->step_s, ps->step_s);
  // A SwiGLU model has no sparse plan.
  Dummy llama = LoadDummy("llama-2-7b");
  Policy lp = sparse;
  EXPECT_EQ(Model::PlanOffload(llama.layout, PolicyOffload(llama.config, lp, w, 0, 0), **cpu).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --allow sparse=K: the planner searches the sparse FFN beside the dense one; the sparse plans it
// picks load (with their bundles) under the budgets they were chosen for; the layout's sparse plan
// is the store's.
TEST(PlannerTest, SparsityIsSearchedWhereAllowedAndFits) {
  ferry::testing::TempDir dir;
  ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), dir.path()).ok());
  auto store = io::Store::Open(dir.path());
  ASSERT_TRUE(store.ok());
  auto cpu = kernels::CreateBackend({});
  OffloadOptions so;
  so.split = {20, 30, 50};
  so.sparse_ffn = true;
  so.sparse_cache_fraction = 0.25;
  auto from_store = Model::PlanOffload(*store, so, **cpu);
  auto own = LayoutOf(*store);
  ASSERT_TRUE(own.ok());
  auto from_layout = Model::PlanOffload(*own, so, **cpu);
  ASSERT_TRUE(from_store.ok() && from_layout.ok()) << from_layout.status();
  EXPECT_EQ(from_store->device_bytes, from_layout->device_bytes);
  EXPECT_EQ(from_store->host_bytes, from_layout->host_bytes);
  ASSERT_EQ(own->attention_ranges.size(), own->layer_bytes.size());

  auto m = CostModel::FromProbe(SyntheticProbe("cpu"));
  ASSERT_TRUE(m.ok());
  PlanRequest r;
  r.config = *ModelConfig::FromModelDir(dir.path());
  auto allow = ParseAllowance("sparse=0.15", r.config.head_dim());
  ASSERT_TRUE(allow.ok()) << allow.status();
  EXPECT_DOUBLE_EQ(allow->sparsity, 0.15);
  EXPECT_EQ(allow->Describe(), "sparse=0.15");
  r.allow = *allow;
  r.layouts = *LayoutsOfStore(*store, r.allow);
  r.workload = {32, 8, 0};
  r.max_batch = 4;
  r.host_budget = 64 << 20;
  r.device_budget = HalfwayBudget(r, **cpu);
  auto cs = SearchPolicies(r, *m, **cpu);
  ASSERT_TRUE(cs.ok()) << cs.status();
  int sparse = 0, dense = 0;
  for (const Candidate& c : *cs) {
    (c.policy.sparsity > 0 ? sparse : dense) += 1;
    if (c.policy.sparsity > 0) {
      EXPECT_NE(c.policy.Flags().find("--sparsity-k 0.15"), std::string::npos);
      EXPECT_NE(c.policy.Flags(/*dummy=*/true).find("--sparsity-sim 0.15"), std::string::npos);
    }
  }
  EXPECT_GT(sparse, 0);
  EXPECT_GT(dense, 0);
  int loaded = 0;
  for (const Candidate& c : *cs) {
    if (c.policy.sparsity == 0 || loaded == 2) continue;
    kernels::BackendOptions bo;
    bo.memory_budget_bytes = r.device_budget;
    bo.host_budget_bytes = r.host_budget;
    auto backend = kernels::CreateBackend(bo);
    ASSERT_TRUE(backend.ok());
    auto model = Model::LoadOffloaded(dir.path(), backend->get(), PolicyOffload(r.config, c.policy, r.workload, r.device_budget, r.host_budget));
    ASSERT_TRUE(model.ok()) << c.policy.Flags() << ": " << model.status();
    EXPECT_TRUE((*model)->sparse_ffn());
    auto cache = offload::CreateKvCache(**backend, PolicyKvSpec(r.config, c.policy, r.workload));
    ASSERT_TRUE(cache.ok()) << c.policy.Flags() << ": " << cache.status();
    ++loaded;
  }
  EXPECT_EQ(loaded, 2);
  for (const std::string bad : {"sparse=0", "sparse=1", "sparse=x"}) EXPECT_FALSE(ParseAllowance(bad, 64).ok()) << bad;
  // A SwiGLU model: sparse is refused in one line.
  PlanRequest lr;
  auto shape = FindDummyShape("llama-2-7b");
  ASSERT_TRUE(shape.ok());
  lr.config = *ModelConfig::FromJson(DummyConfigJson(*shape), "llama-2-7b");
  lr.allow = *allow;
  lr.layouts = *LayoutsOfDummy("llama-2-7b", lr.allow);
  lr.workload = {32, 8, 0};
  auto refused = SearchPolicies(lr, *m, **cpu);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(refused.status().message()).find("ReLU"), std::string::npos) << refused.status();
}

// A float store with q4 allowed: the q4 candidates are planned from the layout convert would
// write, stream fewer bytes, and are marked as needing the conversion.
TEST(PlannerTest, QuantizedCandidatesNeedTheConversion) {
  ferry::testing::TempDir dir;
  ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), dir.path()).ok());
  auto store = io::Store::Open(dir.path());
  auto m = CostModel::FromProbe(SyntheticProbe("cuda"));
  ASSERT_TRUE(store.ok() && m.ok());
  PlanRequest r;
  r.config = *ModelConfig::FromModelDir(dir.path());
  r.allow = *ParseAllowance("q4", r.config.head_dim());
  r.layouts = *LayoutsOfStore(*store, r.allow);
  ASSERT_EQ(r.layouts.size(), 2u);
  r.workload = {32, 8, 0};
  r.max_batch = 8;
  auto cpu = kernels::CreateBackend({});
  r.device_budget = HalfwayBudget(r, **cpu);
  auto cs = SearchPolicies(r, *m, **cpu);
  ASSERT_TRUE(cs.ok()) << cs.status();
  // The q4 plans keep more of the model on the GPU in the same budget.
  double best_float_gpu = 0, best_q4_gpu = 0;
  for (const Candidate& c : *cs) {
    EXPECT_EQ(c.runnable, !c.policy.weights.has_value());
    double& best = c.policy.weights ? best_q4_gpu : best_float_gpu;
    best = std::max(best, c.policy.split.gpu);
  }
  EXPECT_GT(best_q4_gpu, best_float_gpu);
}

}  // namespace
}  // namespace ferry::engine
