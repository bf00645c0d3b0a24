// The ferry store: conversion of tiny-opt (alignment, contiguous layers, checksums), loading a
// model from it with bitwise-identical logits, and corrupt, truncated or lying stores refused.
#include "io/store.h"

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>

#include "engine/model.h"
#include "io/safetensors.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "test_util.h"

namespace ferry::io {
namespace {

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    uint64_t last_done = 0, calls = 0;
    ConvertOptions o;
    o.chunk_bytes = 1 << 20;  // several chunks for the larger tensors
    o.progress = [&](uint64_t done, uint64_t total) {
      EXPECT_GE(done, last_done);
      EXPECT_LE(done, total);
      last_done = done;
      ++calls;
    };
    ASSERT_TRUE(ConvertToStore(ferry::testing::ModelDir(), dir_.path(), o).ok());
    EXPECT_GT(calls, 10u);
  }
  std::string Path(const std::string& f) const { return dir_.File(f); }
  void FlipByte(uint64_t offset) {
    int fd = ::open(Path("weights.bin").c_str(), O_RDWR);
    char c;
    ASSERT_EQ(::pread(fd, &c, 1, offset), 1);
    c ^= 0x5a;
    ASSERT_EQ(::pwrite(fd, &c, 1, offset), 1);
    ::close(fd);
  }
  ferry::testing::TempDir dir_;
};

TEST_F(StoreTest, LayoutIsAlignedAndLayersAreContiguous) {
  auto store = Store::Open(dir_.path());
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE(store->Verify().ok());
  EXPECT_EQ(store->layers().size(), 6u);
  auto ckpt = Checkpoint::Open(ferry::testing::ModelDir());
  EXPECT_EQ(store->Names(), ckpt->Names());
  for (const auto& layer : store->layers()) {
    EXPECT_EQ(layer.offset % kStoreAlignment, 0u);
    uint64_t expect = layer.offset;
    for (const StoreTensor* t : store->LayerTensors(layer.index)) {
      EXPECT_EQ(t->info.offset % kStoreAlignment, 0u) << t->info.name;
      EXPECT_EQ(t->info.offset, expect) << t->info.name;  // packed back to back, 4 KiB apart at most
      expect = (t->info.offset + t->info.bytes + kStoreAlignment - 1) / kStoreAlignment * kStoreAlignment;
    }
    EXPECT_EQ(expect, layer.offset + layer.bytes);
  }
  // Same bytes as the checkpoint.
  const TensorInfo* info = ckpt->Find("model.decoder.layers.3.fc1.weight");
  std::vector<char> a(info->bytes), b(info->bytes);
  ASSERT_TRUE(ckpt->Read(info->name, a.data(), a.size()).ok());
  ASSERT_TRUE(store->Read(info->name, b.data(), b.size()).ok());
  EXPECT_EQ(a, b);
  EXPECT_TRUE(std::filesystem::exists(Path("tokenizer.json")));
  EXPECT_TRUE(std::filesystem::exists(Path("config.json")));
}

TEST_F(StoreTest, ModelFromStoreGivesIdenticalLogits) {
  kernels::CpuBackend cpu;
  auto from_hf = engine::Model::Load(ferry::testing::ModelDir(), &cpu);
  auto from_store = engine::Model::Load(dir_.path(), &cpu);
  ASSERT_TRUE(from_hf.ok() && from_store.ok()) << from_store.status();
  engine::ForwardBatch b{{2, 1248, 262, 2732, 406, 4156}, {0, 0, 0, 0, 0, 0}, {0, 1, 2, 3, 4, 5}, {5}};
  std::vector<float> x, y;
  auto c1 = offload::CreateKvCache(cpu, engine::KvSpec((*from_hf)->config(), 1, 8));
  auto c2 = offload::CreateKvCache(cpu, engine::KvSpec((*from_hf)->config(), 1, 8));
  ASSERT_TRUE((*from_hf)->Forward(b, **c1, &x).ok());
  ASSERT_TRUE((*from_store)->Forward(b, **c2, &y).ok());
  EXPECT_EQ(x, y);
}

TEST_F(StoreTest, CorruptByteIsDataLoss) {
  auto store = Store::Open(dir_.path());
  const StoreTensor* t = store->FindTensor("model.decoder.layers.2.fc2.weight");
  ASSERT_NE(t, nullptr);
  FlipByte(t->info.offset + 1000);
  auto reopened = Store::Open(dir_.path());
  ASSERT_TRUE(reopened.ok());  // the manifest is fine; the data is not
  const absl::Status v = reopened->Verify();
  EXPECT_EQ(v.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(v.message().find("layers.2.fc2.weight"), std::string::npos) << v;
  std::vector<char> buf(t->info.bytes);
  EXPECT_EQ(reopened->Read(t->info.name, buf.data(), buf.size()).code(), absl::StatusCode::kDataLoss);
  kernels::CpuBackend cpu;
  EXPECT_EQ(engine::Model::Load(dir_.path(), &cpu).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(StoreTest, TruncatedOrMissingDataFile) {
  ASSERT_EQ(::truncate(Path("weights.bin").c_str(), 100000), 0);
  auto s = Store::Open(dir_.path());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.status().message().find("truncated"), std::string::npos) << s.status();
  std::filesystem::remove(Path("weights.bin"));
  EXPECT_EQ(Store::Open(dir_.path()).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(StoreTest, LyingManifestIsRefused) {
  auto text = ReadFileToString(Path("manifest.json"));
  auto m = nlohmann::json::parse(*text);
  auto write = [&](const nlohmann::json& j) { ferry::testing::WriteFile(Path("manifest.json"), j.dump()); };
  auto code = [&] { return Store::Open(dir_.path()).status().code(); };

  auto bad = m;
  bad["tensors"][0]["offset"] = bad["tensors"][0]["offset"].get<uint64_t>() + 8;  // misaligned
  write(bad);
  EXPECT_EQ(code(), absl::StatusCode::kDataLoss);
  bad = m;
  bad["tensors"][1]["offset"] = m["tensors"][0]["offset"];  // overlap
  write(bad);
  EXPECT_EQ(code(), absl::StatusCode::kDataLoss);
  bad = m;
  bad["tensors"][0]["bytes"] = 12;  // not dtype x shape
  write(bad);
  EXPECT_EQ(code(), absl::StatusCode::kDataLoss);
  bad = m;
  bad["tensors"][0]["offset"] = m["data_bytes"].get<uint64_t>();  // past the end
  write(bad);
  EXPECT_EQ(code(), absl::StatusCode::kDataLoss);
  ferry::testing::WriteFile(Path("manifest.json"), "{\"format\": \"ferry-store\", ");
  EXPECT_EQ(code(), absl::StatusCode::kDataLoss);
  write(m);
  EXPECT_TRUE(Store::Open(dir_.path()).ok());
}

TEST(StoreNamesTest, LayerOfTensor) {
  EXPECT_EQ(LayerOfTensor("model.decoder.layers.11.fc1.weight"), 11);
  EXPECT_EQ(LayerOfTensor("model.decoder.embed_tokens.weight"), -1);
  EXPECT_EQ(LayerOfTensor("model.decoder.layers.x.fc1"), -1);
  EXPECT_EQ(LayerOfTensor("layers.0.w"), 0);
}

TEST(StoreConvertTest, MissingModelIsNotFound) {
  ferry::testing::TempDir out;
  EXPECT_EQ(ConvertToStore("/nonexistent-ferry", out.path()).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ferry::io
