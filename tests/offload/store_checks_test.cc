// Offloaded runs never compute on unchecked bytes: a flipped byte in a layer matrix, or a wrong
// checksum in the manifest, refuses the store at load for every tier (it used to stream garbage
// with exit 0), and a disk part that changes after the load fails the forward pass (kDataLoss).
#include <fcntl.h>
#include <unistd.h>

#include "base/file.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "io/store.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

using ferry::testing::FlipByte;

absl::Status LoadStatus(const std::string& dir, offload::WeightSplit split) {
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = split;
  return Model::LoadOffloaded(dir, &backend, o).status();
}

class StoreChecksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = tmp_.path() + "/store";
    ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), dir_).ok());
    auto s = io::Store::Open(dir_);
    ASSERT_TRUE(s.ok());
    const io::StoreTensor* t = s->FindTensor("model.decoder.layers.3.fc1.weight");
    ASSERT_NE(t, nullptr);
    offset_ = t->info.offset + t->info.bytes / 2;
  }
  ferry::testing::TempDir tmp_;
  std::string dir_;
  uint64_t offset_ = 0;
};

TEST_F(StoreChecksTest, FlippedByteInALayerMatrixIsRefusedOnEveryTier) {
  FlipByte(dir_ + "/weights.bin", offset_);
  for (const offload::WeightSplit split : {offload::WeightSplit{0, 0, 100}, offload::WeightSplit{0, 100, 0},
                                           offload::WeightSplit{100, 0, 0}, offload::WeightSplit{20, 30, 50}}) {
    const absl::Status s = LoadStatus(dir_, split);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(s.message().find("layers.3.fc1.weight"), std::string::npos) << s;
  }
}

TEST_F(StoreChecksTest, WrongSumInTheManifestIsRefused) {
  auto text = ReadFileToString(dir_ + "/manifest.json");
  nlohmann::json m = nlohmann::json::parse(*text);
  for (auto& t : m["tensors"]) {
    if (t["name"] == "model.decoder.layers.1.self_attn.k_proj.weight") t["xxh3"] = "0123456789abcdef";
  }
  ferry::testing::WriteFile(dir_ + "/manifest.json", m.dump());
  absl::Status s = LoadStatus(dir_, {0, 0, 100});
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("manifest checksum"), std::string::npos) << s;  // the tables' own checksum
  // A store written before the tables had a checksum: the tensor's own check refuses it.
  m.erase("manifest_xxh3");
  ferry::testing::WriteFile(dir_ + "/manifest.json", m.dump());
  s = LoadStatus(dir_, {0, 0, 100});
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("k_proj"), std::string::npos) << s;
}

TEST_F(StoreChecksTest, DiskBytesThatChangeAfterTheLoadFailTheStep) {
  kernels::CpuBackend backend;
  OffloadOptions o;
  o.split = {0, 0, 100};
  auto m = Model::LoadOffloaded(dir_, &backend, o);
  ASSERT_TRUE(m.ok()) << m.status();
  auto cache = offload::CreateKvCache(backend, KvSpec((*m)->config(), 1, 8));
  ASSERT_TRUE(cache.ok());
  std::vector<float> logits;
  // The pipeline reads ahead; change the file, then run enough passes that layer 3 is read again.
  FlipByte(dir_ + "/weights.bin", offset_);
  absl::Status s;
  for (int i = 0; i < 4 && s.ok(); ++i) s = (*m)->Forward({{2, 5, 6}, {0, 0, 0}, {0, 1, 2}, {2}}, **cache, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("layer 3"), std::string::npos) << s;
}

}  // namespace
}  // namespace ferry::engine
