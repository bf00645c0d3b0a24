// Quantized weights in the store (issue 15): `ferry convert --quantize` writes each layer matrix as
// one q4/q8 region (values, scales, minimums; 4 KiB-aligned inside its layer's block), a model
// loaded from that store resident or offloaded on any tier computes the logits of quantizing at
// load bit for bit, the layer blocks (what crosses the links each step) shrink by the packed
// size, a flipped byte in a scale block is caught by the checksums on every tier, and a manifest
// that lies about a quantized tensor is refused.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "base/file.h"
#include "engine/dummy_model.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "io/store.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

using ferry::testing::FlipByte;

// Prefill of two prompts and two decode steps; every logit.
std::vector<float> RunSteps(Model& m, kernels::Backend& b) {
  auto cache = offload::CreateKvCache(b, KvSpec(m.config(), 2, 16));
  EXPECT_TRUE(cache.ok());
  std::vector<float> all, logits;
  ForwardBatch pre{{2, 1248, 262, 2732, 2, 1777, 554}, {0, 0, 0, 0, 1, 1, 1}, {0, 1, 2, 3, 0, 1, 2}, {0, 1, 2, 3, 4, 5, 6}};
  EXPECT_TRUE(m.Forward(pre, **cache, &logits).ok());
  all.insert(all.end(), logits.begin(), logits.end());
  for (int step = 0; step < 2; ++step) {
    ForwardBatch dec{{406 + step, 342 + step}, {0, 1}, {4 + step, 3 + step}, {0, 1}};
    const absl::Status s = m.Forward(dec, **cache, &logits);
    EXPECT_TRUE(s.ok()) << s;
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

class QuantStoreTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    format_ = *ParseQuantFormatName(GetParam());
    dir_ = tmp_.path() + "/store";
    GgufLoadOptions go;
    go.quantize = format_;
    const absl::Status s = ConvertModel(ferry::testing::ModelDir(), dir_, {}, go);
    ASSERT_TRUE(s.ok()) << s;
  }
  QuantFormat format_;
  ferry::testing::TempDir tmp_;
  std::string dir_;
};

TEST_P(QuantStoreTest, EveryLayerMatrixIsOneQuantizedRegionAndTheRestKeepTheirDtype) {
  auto store = io::Store::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  int quantized = 0;
  for (const std::string& name : store->Names()) {
    const io::StoreTensor* t = store->FindTensor(name);
    const bool matrix = t->layer >= 0 && t->info.shape.size() == 2;
    EXPECT_EQ(t->info.quant.has_value(), matrix) << name;
    if (!matrix) continue;
    ++quantized;
    EXPECT_EQ(*t->info.quant, format_);
    EXPECT_EQ(t->info.dtype, DType::kU8);
    auto layout = LayoutQuantized(format_, t->info.shape[0], t->info.shape[1]);
    ASSERT_TRUE(layout.ok());
    EXPECT_EQ(t->info.bytes, layout->bytes) << name;
    EXPECT_EQ(t->info.offset % 4096, 0u);
    // The region dequantizes to the quantization of the checkpoint's values (round trip bitwise).
    std::vector<uint8_t> q(t->info.bytes);
    ASSERT_TRUE(store->Read(name, q.data(), q.size()).ok());
    auto src = io::OpenTensorSource(ferry::testing::ModelDir());
    ASSERT_TRUE(src.ok());
    const io::TensorInfo* orig = (*src)->Find(name);
    ASSERT_NE(orig, nullptr);
    std::vector<char> raw(orig->bytes);
    ASSERT_TRUE((*src)->Read(name, raw.data(), raw.size()).ok());
    std::vector<float> w(static_cast<size_t>(orig->numel()));
    ConvertToF32(orig->dtype, raw.data(), w.data(), w.size());
    std::vector<uint8_t> want(layout->bytes);
    QuantizeRows(format_, *layout, w.data(), t->info.shape[0], t->info.shape[1], want.data());
    EXPECT_EQ(q, want) << name;
  }
  EXPECT_EQ(quantized, 6 * 6);  // tiny-opt: 6 layers x Q, K, V, O, FC1, FC2
}

TEST_P(QuantStoreTest, ResidentAndOffloadedOnEveryTierComputeTheLogitsOfQuantizingAtLoad) {
  kernels::CpuBackend backend;
  GgufLoadOptions go;
  go.quantize = format_;
  auto at_load = Model::Load(ferry::testing::ModelDir(), &backend, go);
  ASSERT_TRUE(at_load.ok()) << at_load.status();
  const std::vector<float> want = RunSteps(**at_load, backend);
  auto plain = Model::Load(ferry::testing::ModelDir(), &backend);
  ASSERT_TRUE(plain.ok());
  EXPECT_NE(RunSteps(**plain, backend), want);  // the quantization changes the logits

  auto resident = Model::Load(dir_, &backend);
  ASSERT_TRUE(resident.ok()) << resident.status();
  EXPECT_EQ(RunSteps(**resident, backend), want);
  for (const offload::WeightSplit split : {offload::WeightSplit{0, 0, 100}, offload::WeightSplit{0, 100, 0},
                                           offload::WeightSplit{100, 0, 0}, offload::WeightSplit{20, 30, 50}}) {
    OffloadOptions o;
    o.split = split;
    auto m = Model::LoadOffloaded(dir_, &backend, o);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(RunSteps(**m, backend), want) << split.gpu << "," << split.cpu << "," << split.disk;
  }
  // Asking again for a quantization the store already has is fine; another one is refused.
  auto same = Model::Load(dir_, &backend, go);
  EXPECT_TRUE(same.ok()) << same.status();
  GgufLoadOptions other;
  other.quantize = QuantFormat{format_.kind == QuantKind::kQ4 ? QuantKind::kQ8 : QuantKind::kQ4, 64};
  const absl::Status refused = Model::Load(dir_, &backend, other).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_NE(refused.message().find("already"), std::string::npos) << refused;
}

TEST_P(QuantStoreTest, TheStreamedBlocksShrinkByThePackedSize) {
  ferry::testing::TempDir f16_tmp;
  ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), f16_tmp.path() + "/s").ok());
  auto q = io::Store::Open(dir_);
  auto f = io::Store::Open(f16_tmp.path() + "/s");
  ASSERT_TRUE(q.ok() && f.ok());
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = {0, 100, 0};
  auto qp = Model::PlanOffload(*q, o, backend);
  auto fp = Model::PlanOffload(*f, o, backend);
  ASSERT_TRUE(qp.ok() && fp.ok());
  // tiny-opt's matrices are F16 in the checkpoint (2 bytes a weight): q4 g64 holds 4.5 bits
  // (values + fp16 scale and minimum per 64), q8 8.25 bits, before the 4 KiB rounding of each region.
  const double bits = format_.kind == QuantKind::kQ4 ? 4.0 + 32.0 / format_.group : 8.0 + 16.0 / format_.group;
  uint64_t weights = 0;
  for (int l = 0; l < 6; ++l) {
    for (const io::StoreTensor* t : f->LayerTensors(l)) {
      if (t->info.shape.size() == 2) weights += static_cast<uint64_t>(t->info.numel());
    }
  }
  const double q_bytes = static_cast<double>(qp->pinned_bytes), f_bytes = static_cast<double>(fp->pinned_bytes);
  EXPECT_LT(q_bytes, f_bytes * (bits / 16.0) + 6 * 10 * 4096.0);  // regions and vectors rounded to 4 KiB
  EXPECT_GE(q_bytes, weights * bits / 8.0);
  RecordProperty("pinned_bytes_ratio", std::to_string(f_bytes / q_bytes));
}

TEST_P(QuantStoreTest, AFlippedScaleByteIsCaughtOnEveryTier) {
  auto store = io::Store::Open(dir_);
  ASSERT_TRUE(store.ok());
  const io::StoreTensor* t = store->FindTensor("model.decoder.layers.2.self_attn.v_proj.weight");
  ASSERT_NE(t, nullptr);
  auto layout = LayoutQuantized(format_, t->info.shape[0], t->info.shape[1]);
  ASSERT_TRUE(layout.ok());
  FlipByte(dir_ + "/weights.bin", t->info.offset + layout->scales_offset + 7);  // a scale's high byte
  for (const offload::WeightSplit split : {offload::WeightSplit{0, 0, 100}, offload::WeightSplit{0, 100, 0},
                                           offload::WeightSplit{100, 0, 0}}) {
    kernels::CpuBackend backend;
    OffloadOptions o;
    o.split = split;
    const absl::Status s = Model::LoadOffloaded(dir_, &backend, o).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(s.message().find("layers.2.self_attn.v_proj.weight"), std::string::npos) << s;
  }
  kernels::CpuBackend backend;
  const absl::Status resident = Model::Load(dir_, &backend).status();
  EXPECT_EQ(resident.code(), absl::StatusCode::kDataLoss) << resident;
  EXPECT_EQ(store->Verify().code(), absl::StatusCode::kDataLoss);
}

TEST_P(QuantStoreTest, AManifestThatLiesAboutAQuantizedTensorIsRefused) {
  const std::string path = dir_ + "/manifest.json";
  const std::string original = *ReadFileToString(path);
  auto edit = [&](const std::function<void(nlohmann::json&)>& change) {
    nlohmann::json m = nlohmann::json::parse(original);
    for (auto& t : m["tensors"]) {
      if (t["name"] == "model.decoder.layers.0.fc1.weight") change(t);
    }
    m.erase("manifest_xxh3");  // as if written before the tables had a checksum: the checks below must hold alone
    ferry::testing::WriteFile(path, m.dump());
    return io::Store::Open(dir_).status();
  };
  for (const auto& [what, change] : std::vector<std::pair<std::string, std::function<void(nlohmann::json&)>>>{
           {"q4 or q8", [](nlohmann::json& t) { t["quant"] = "q5g64"; }},
           {"format", [](nlohmann::json& t) { t["quant"] = "q4g0"; }},
           {"must be a 2-D U8", [](nlohmann::json& t) { t["dtype"] = "F16"; }},
           {"bytes do not match its format", [](nlohmann::json& t) { t["quant"] = t["quant"] == "q4g64" ? "q8g64" : "q4g64"; }},
           {"bytes do not match its format", [](nlohmann::json& t) { t["shape"][1] = 100; }},
           {"must be a 2-D U8", [](nlohmann::json& t) { t["shape"] = {512}; }}}) {
    const absl::Status s = edit(change);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << what << ": " << s;
    EXPECT_NE(s.message().find(what), std::string::npos) << what << ": " << s;
  }
  // Dropping "quant" leaves a U8 tensor whose bytes are not its shape's.
  const absl::Status s = edit([](nlohmann::json& t) { t.erase("quant"); });
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
}

// Deja Vu over a quantized store: the neuron bundles are quantized too (one read per neuron, about
// 3.4x (q4g64; 3.1x q4g32) / 1.9x (q8) fewer bytes than fp16 bundles), FC1's row keeps the store's codes, scales
// and minimums bit for bit, FC2's column is requantized along d; with every neuron the logits stay
// within the second rounding of FC2 of the dense quantized model's, from pinned memory and from disk.
TEST_P(QuantStoreTest, SparseFfnReadsQuantizedBundles) {
  kernels::CpuBackend resident_backend;
  auto resident = Model::LoadOffloaded(dir_, &resident_backend, OffloadOptions{});
  ASSERT_TRUE(resident.ok()) << resident.status();
  const std::vector<float> dense = RunSteps(**resident, resident_backend);
  const ModelConfig& c = (*resident)->config();
  auto store = io::Store::Open(dir_);
  ASSERT_TRUE(store.ok());
  const io::TensorInfo* up = store->Find("model.decoder.layers.0.fc1.weight");
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(up->quant.has_value());
  std::vector<uint8_t> fc1(up->bytes);
  ASSERT_TRUE(store->Read("model.decoder.layers.0.fc1.weight", fc1.data(), fc1.size()).ok());
  auto fc1_layout = LayoutQuantized(format_, c.ffn_dim, c.hidden_size);
  auto bundle_layout = LayoutQuantBundle(format_, c.hidden_size);
  ASSERT_TRUE(fc1_layout.ok() && bundle_layout.ok());
  for (const offload::WeightSplit split : {offload::WeightSplit{0, 100, 0}, offload::WeightSplit{0, 0, 100}}) {
    SCOPED_TRACE(split.disk);
    kernels::CpuBackend backend;
    OffloadOptions o;
    o.split = split;
    o.sparse_ffn = true;
    auto m = Model::LoadOffloaded(dir_, &backend, o);
    ASSERT_TRUE(m.ok()) << m.status();
    const offload::FfnBundles& bundles = *(*m)->bundles();
    EXPECT_EQ(bundles.bundle_bytes(), bundle_layout->bytes);
    const double fp16 = static_cast<double>(offload::FfnBundles::BundleBytes(c.hidden_size, DType::kF16));
    EXPECT_GE(fp16 / static_cast<double>(bundles.bundle_bytes()), format_.kind == QuantKind::kQ4 ? (format_.group >= 64 ? 3.2 : 3.0) : 1.8);
    const std::vector<float> got = RunSteps(**m, backend);
    ASSERT_EQ(got.size(), dense.size());
    double diff = 0, mag = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::abs(got[i] - dense[i])));
      mag = std::max(mag, static_cast<double>(std::abs(dense[i])));
    }
    EXPECT_GT(diff, 0.0);  // FC2 was requantized
    EXPECT_LT(diff / mag, format_.kind == QuantKind::kQ4 ? 0.05 : 0.005) << diff / mag;
    RecordProperty(absl::StrCat("rel_logit_diff_", GetParam(), split.disk > 0 ? "_disk" : "_pinned"), std::to_string(diff / mag));
    // FC1's rows in the bundles are the store's bytes.
    std::vector<int32_t> every(static_cast<size_t>(c.ffn_dim));
    for (int j = 0; j < c.ffn_dim; ++j) every[static_cast<size_t>(j)] = j;
    offload::FfnBundleLayout bl;
    bl.d = c.hidden_size;
    bl.ffn = c.ffn_dim;
    bl.dtype = DType::kU8;
    bl.quant = format_;
    bl.up = {"model.decoder.layers.0.fc1.weight"};
    bl.up_bias = {"model.decoder.layers.0.fc1.bias"};
    bl.down = {"model.decoder.layers.0.fc2.weight"};
    auto own = offload::FfnBundles::Create(&backend, *store, bl, {split.disk > 0, 0.0, {}});
    ASSERT_TRUE(own.ok()) << own.status();
    auto view = (*own)->Gather(0, every);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_TRUE(view->quant.has_value());
    const size_t row_values = format_.kind == QuantKind::kQ4 ? c.hidden_size / 2 : c.hidden_size;
    const size_t groups = static_cast<size_t>(c.hidden_size / format_.group);
    for (int j = 0; j < c.ffn_dim; j += 37) {
      const uint8_t* b = view->as<const uint8_t>() + static_cast<size_t>(j) * bundles.bundle_bytes();
      EXPECT_EQ(std::memcmp(b, fc1.data() + j * row_values, row_values), 0) << j;
      EXPECT_EQ(std::memcmp(b + bundle_layout->row.scales_offset, fc1.data() + fc1_layout->scales_offset + j * groups * 2, groups * 2), 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantStoreTest, ::testing::Values("q4g64", "q8g64", "q4g32"));

// A quantized dummy (random codes) loads and runs, and streams the packed bytes.
TEST(QuantDummyTest, Opt125mQ4StoreRunsOffloaded) {
  ferry::testing::TempDir tmp;
  auto shape = FindDummyShape("opt-125m");
  ASSERT_TRUE(shape.ok());
  DummyStoreOptions o;
  o.quantize = QuantFormat{QuantKind::kQ4, 64};
  ASSERT_TRUE(WriteDummyStore(*shape, tmp.path() + "/q4", o).ok());
  kernels::CpuBackend backend;
  OffloadOptions off;
  off.split = {0, 100, 0};
  auto m = Model::LoadOffloaded(tmp.path() + "/q4", &backend, off);
  ASSERT_TRUE(m.ok()) << m.status();
  auto cache = offload::CreateKvCache(backend, KvSpec((*m)->config(), 1, 8));
  ASSERT_TRUE(cache.ok());
  std::vector<float> logits;
  ASSERT_TRUE((*m)->Forward({{2, 5, 6}, {0, 0, 0}, {0, 1, 2}, {2}}, **cache, &logits).ok());
  float lo = logits[0], hi = logits[0];
  for (float x : logits) {
    ASSERT_TRUE(std::isfinite(x));
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  EXPECT_LT(lo, hi);
  // 12 layers of 4 x 768^2 + 2 x 768 x 3072 weights at 4.5 bits, plus the layers' vectors.
  const double weights = 12.0 * (4 * 768 * 768 + 2 * 768 * 3072);
  EXPECT_NEAR(static_cast<double>((*m)->plan().pinned_bytes), weights * 4.5 / 8, weights * 4.5 / 8 * 0.02);
}

}  // namespace
}  // namespace ferry::engine
