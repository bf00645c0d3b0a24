// Safetensors reading: values of every dtype, sharded checkpoints, and every kind of bad file
// refused with its specific error before any tensor is read.
#include "io/safetensors.h"

#include "gtest/gtest.h"
#include "test_util.h"

namespace ferry::io {
namespace {

using ferry::testing::MakeTensor;
using ferry::testing::SerializeSafetensors;
using ferry::testing::StTensor;
using ferry::testing::TempDir;
using ferry::testing::WriteFile;

std::vector<StTensor> SomeTensors() {
  return {MakeTensor("a", DType::kF16, {2, 3}, {1, -2, 3.5f, 0.25f, 65504, -0.0f}),
          MakeTensor("b", DType::kBF16, {4}, {1, 2, 3, 4}), MakeTensor("c", DType::kF32, {1, 2}, {3.14159f, -1e-7f})};
}

absl::StatusCode OpenCode(const std::string& bytes) {
  TempDir dir;
  WriteFile(dir.File("x.safetensors"), bytes);
  return SafetensorsFile::Open(dir.File("x.safetensors")).status().code();
}

TEST(SafetensorsTest, ReadsValuesOfEveryDtype) {
  TempDir dir;
  const auto tensors = SomeTensors();
  WriteFile(dir.File("model.safetensors"), SerializeSafetensors(tensors));
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  for (const auto& t : tensors) {
    const TensorInfo* info = ckpt->Find(t.name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->dtype, t.dtype);
    EXPECT_EQ(info->shape, t.shape);
    std::string got(info->bytes, '\0');
    ASSERT_TRUE(ckpt->Read(t.name, got.data(), got.size()).ok());
    EXPECT_EQ(got, t.bytes) << t.name;
  }
  std::string small(3, '\0');
  EXPECT_EQ(ckpt->Read("a", small.data(), small.size()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ckpt->Read("zzz", small.data(), small.size()).code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, ShardedCheckpoint) {
  TempDir dir;
  auto t = SomeTensors();
  WriteFile(dir.File("s1.safetensors"), SerializeSafetensors({t[0], t[1]}));
  WriteFile(dir.File("s2.safetensors"), SerializeSafetensors({t[2]}));
  nlohmann::json index = {{"weight_map", {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"c", "s2.safetensors"}}}};
  WriteFile(dir.File("model.safetensors.index.json"), index.dump());
  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->Names().size(), 3u);
  std::string got(8, '\0');
  ASSERT_TRUE(ckpt->Read("c", got.data(), got.size()).ok());
  EXPECT_EQ(got, t[2].bytes);
}

TEST(SafetensorsTest, MissingShardIsNotFound) {
  TempDir dir;
  auto t = SomeTensors();
  WriteFile(dir.File("s1.safetensors"), SerializeSafetensors({t[0]}));
  nlohmann::json index = {{"weight_map", {{"a", "s1.safetensors"}, {"c", "s2.safetensors"}}}};
  WriteFile(dir.File("model.safetensors.index.json"), index.dump());
  auto ckpt = Checkpoint::Open(dir.path());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(ckpt.status().message().find("s2.safetensors"), std::string::npos);
}

TEST(SafetensorsTest, IndexNamingATensorTheShardLacksIsDataLoss) {
  TempDir dir;
  WriteFile(dir.File("s1.safetensors"), SerializeSafetensors({SomeTensors()[0]}));
  WriteFile(dir.File("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors", "q": "s1.safetensors"}})");
  EXPECT_EQ(Checkpoint::Open(dir.path()).status().code(), absl::StatusCode::kDataLoss);
}

TEST(SafetensorsTest, MalformedIndexJson) {
  TempDir dir;
  WriteFile(dir.File("model.safetensors.index.json"), "{\"weight_map\": {");
  EXPECT_EQ(Checkpoint::Open(dir.path()).status().code(), absl::StatusCode::kDataLoss);
}

TEST(SafetensorsTest, EmptyDirectoryIsNotFound) {
  TempDir dir;
  EXPECT_EQ(Checkpoint::Open(dir.path()).status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, TruncatedFileIsDataLoss) {
  const std::string good = SerializeSafetensors(SomeTensors());
  // Cut inside the data, inside the header, and inside the length prefix.
  EXPECT_EQ(OpenCode(good.substr(0, good.size() - 1)), absl::StatusCode::kDataLoss);
  EXPECT_EQ(OpenCode(good.substr(0, 20)), absl::StatusCode::kDataLoss);
  EXPECT_EQ(OpenCode(good.substr(0, 5)), absl::StatusCode::kDataLoss);
  EXPECT_EQ(OpenCode(""), absl::StatusCode::kDataLoss);
}

TEST(SafetensorsTest, HeaderOffsetsOutOfRange) {
  auto t = SomeTensors();
  nlohmann::json h = {{"a", {{"dtype", "F16"}, {"shape", {2, 3}}, {"data_offsets", {0, 12}}}},
                      {"b", {{"dtype", "BF16"}, {"shape", {4}}, {"data_offsets", {1000, 1008}}}}};
  EXPECT_EQ(OpenCode(SerializeSafetensors({t[0], t[1]}, h.dump())), absl::StatusCode::kDataLoss);
  // Begin after end.
  h["b"]["data_offsets"] = {20, 12};
  EXPECT_EQ(OpenCode(SerializeSafetensors({t[0], t[1]}, h.dump())), absl::StatusCode::kDataLoss);
}

TEST(SafetensorsTest, SizeNotMatchingDtypeTimesShape) {
  auto t = SomeTensors();
  nlohmann::json h = {{"a", {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 12}}}}};
  auto st = SafetensorsFile::Open("/nonexistent");  // keep the API honest about missing files too
  EXPECT_EQ(st.status().code(), absl::StatusCode::kNotFound);
  TempDir dir;
  WriteFile(dir.File("x.safetensors"), SerializeSafetensors({t[0]}, h.dump()));
  auto f = SafetensorsFile::Open(dir.File("x.safetensors"));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(f.status().message().find("needs 24"), std::string::npos) << f.status();
}

TEST(SafetensorsTest, OverlappingTensorsAreRefused) {
  auto t = SomeTensors();
  nlohmann::json h = {{"a", {{"dtype", "F16"}, {"shape", {2, 3}}, {"data_offsets", {0, 12}}}},
                      {"b", {{"dtype", "BF16"}, {"shape", {4}}, {"data_offsets", {8, 16}}}}};
  EXPECT_EQ(OpenCode(SerializeSafetensors({t[0], t[1]}, h.dump())), absl::StatusCode::kDataLoss);
}

TEST(SafetensorsTest, LyingHeaderLengthAndBadJson) {
  std::string good = SerializeSafetensors(SomeTensors());
  std::string huge = good;
  huge[7] = 0x7f;  // header length ~ 2^63
  EXPECT_EQ(OpenCode(huge), absl::StatusCode::kDataLoss);
  std::string past_end = good;
  past_end[0] = static_cast<char>(0xff), past_end[1] = 0x0f;  // longer than the file, under 100 MiB
  EXPECT_EQ(OpenCode(past_end), absl::StatusCode::kDataLoss);
  EXPECT_EQ(OpenCode(SerializeSafetensors({}, "{\"a\": [1, 2")), absl::StatusCode::kDataLoss);
  EXPECT_EQ(OpenCode(SerializeSafetensors({}, "[1, 2, 3]")), absl::StatusCode::kDataLoss);
  nlohmann::json bad_dtype = {{"a", {{"dtype", "F8"}, {"shape", {1}}, {"data_offsets", {0, 1}}}}};
  EXPECT_EQ(OpenCode(SerializeSafetensors({}, bad_dtype.dump()) + "x"), absl::StatusCode::kDataLoss);
  nlohmann::json bad_shape = {{"a", {{"dtype", "F32"}, {"shape", {-1}}, {"data_offsets", {0, 4}}}}};
  EXPECT_EQ(OpenCode(SerializeSafetensors({}, bad_shape.dump()) + "abcd"), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace ferry::io
