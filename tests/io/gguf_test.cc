// GGUF reading: ferry's dequantizers against the gguf package's (scripts/make_gguf_vectors.py wrote
// blocks and the package's float32 results: real SmolLM2 blocks, blocks it quantized from real
// weights, random blocks), compared bit for bit; metadata of every type; and each kind of lying or
// truncated file refused with its specific error before any tensor is read.
#include "io/gguf.h"

#include <cstring>

#include "gguf_util.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace ferry::io {
namespace {

using ferry::testing::GgufBuilder;
using ferry::testing::TempDir;
using ferry::testing::WriteFile;

TEST(GgufTest, DequantizesEveryTypeBitExactlyAsTheGgufPackage) {
  auto f = GgufFile::Open(ferry::testing::DataDir() + "/gguf/quant-vectors.gguf");
  ASSERT_TRUE(f.ok()) << f.status();
  int types = 0;
  for (const char* name : {"F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}) {
    const GgufTensor* q = (*f)->FindTensor(std::string(name) + ".q");
    const GgufTensor* want = (*f)->FindTensor(std::string(name) + ".f32");
    ASSERT_NE(q, nullptr) << name;
    ASSERT_NE(want, nullptr) << name;
    EXPECT_STREQ(GgmlTypeName(q->type), name);
    ASSERT_EQ(q->ne, want->ne);
    ASSERT_GE(q->rows(), 64);
    std::vector<float> got(static_cast<size_t>(q->rows() * q->row_elements())), expected(got.size());
    ASSERT_TRUE((*f)->ReadRowsF32(*q, 0, q->rows(), got.data()).ok());
    ASSERT_TRUE((*f)->ReadRowsF32(*want, 0, want->rows(), expected.data()).ok());
    size_t differ = 0;
    for (size_t i = 0; i < got.size(); ++i) differ += std::memcmp(&got[i], &expected[i], 4) != 0;
    EXPECT_EQ(differ, 0u) << name << ": " << differ << " of " << got.size() << " values differ";
    // A row range in the middle is the same as that part of the whole.
    std::vector<float> mid(static_cast<size_t>(3 * q->row_elements()));
    ASSERT_TRUE((*f)->ReadRowsF32(*q, 5, 3, mid.data()).ok());
    EXPECT_EQ(0, std::memcmp(mid.data(), got.data() + 5 * q->row_elements(), mid.size() * 4)) << name;
    ++types;
  }
  EXPECT_EQ(types, 10);
}

std::string Simple(GgufBuilder* b = nullptr) {
  GgufBuilder local;
  GgufBuilder& g = b ? *b : local;
  g.Str("general.architecture", "llama");
  g.U32("llama.block_count", 2);
  g.F32("llama.rope.freq_base", 10000.5f);
  g.Bool("tokenizer.ggml.add_bos_token", true);
  g.Strings("tokenizer.ggml.tokens", {"a", "b", "<s>"});
  g.I32s("tokenizer.ggml.token_type", {1, 1, 3});
  g.AddF32("w", {4, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
  g.AddF32("v", {3}, {9, 10, 11});
  return g.Build();
}

TEST(GgufTest, ReadsMetadataAndTensors) {
  TempDir dir;
  WriteFile(dir.File("m.gguf"), Simple());
  auto f = GgufFile::Open(dir.File("m.gguf"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*(*f)->String("general.architecture"), "llama");
  EXPECT_EQ(*(*f)->Uint("llama.block_count"), 2u);
  EXPECT_FLOAT_EQ(static_cast<float>(*(*f)->Float("llama.rope.freq_base")), 10000.5f);
  EXPECT_TRUE(*(*f)->Bool("tokenizer.ggml.add_bos_token"));
  EXPECT_EQ((**(*f)->Strings("tokenizer.ggml.tokens"))[2], "<s>");
  EXPECT_EQ((**(*f)->Ints("tokenizer.ggml.token_type"))[2], 3);
  EXPECT_EQ((*f)->String("llama.block_count").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*f)->Uint("nope").status().code(), absl::StatusCode::kNotFound);
  const GgufTensor* w = (*f)->FindTensor("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->shape(), (std::vector<int64_t>{2, 4}));
  std::vector<float> row(4);
  ASSERT_TRUE((*f)->ReadRowsF32(*w, 1, 1, row.data()).ok());
  EXPECT_EQ(row, (std::vector<float>{5, 6, 7, 8}));
  EXPECT_EQ((*f)->ReadRowsF32(*w, 1, 2, row.data()).code(), absl::StatusCode::kOutOfRange);
}

struct BadCase {
  const char* what;
  std::string bytes;
  absl::StatusCode code;
  const char* message;
};

std::vector<BadCase> BadFiles() {
  std::vector<BadCase> cases;
  const std::string good = Simple();
  cases.push_back({"truncated in the data", good.substr(0, good.size() - 4), absl::StatusCode::kDataLoss, "outside"});
  cases.push_back({"truncated in the header", good.substr(0, 60), absl::StatusCode::kDataLoss, "does not fit in the file"});
  cases.push_back({"truncated in a string", good.substr(0, 110), absl::StatusCode::kDataLoss, "claims"});
  cases.push_back({"empty", "", absl::StatusCode::kDataLoss, "shorter than a GGUF header"});
  {
    std::string b = good;
    b[0] = 'X';
    cases.push_back({"bad magic", b, absl::StatusCode::kDataLoss, "magic"});
  }
  {
    GgufBuilder g;
    g.version = 1;
    cases.push_back({"version 1", Simple(&g), absl::StatusCode::kInvalidArgument, "version 1"});
  }
  {
    GgufBuilder g;
    g.kv_count_override = 1ll << 40;
    cases.push_back({"huge metadata count", Simple(&g), absl::StatusCode::kDataLoss, "metadata count"});
  }
  {
    GgufBuilder g;
    g.tensor_count_override = 1000;
    cases.push_back({"lying tensor count", Simple(&g), absl::StatusCode::kDataLoss, ""});
  }
  {
    GgufBuilder g;
    std::string kv;
    const uint64_t klen = 3;
    kv.append(reinterpret_cast<const char*>(&klen), 8);
    kv += "key";
    const uint32_t t = 8;
    kv.append(reinterpret_cast<const char*>(&t), 4);
    const uint64_t slen = 1ull << 50;
    kv.append(reinterpret_cast<const char*>(&slen), 8);
    g.RawKv(kv);
    cases.push_back({"string longer than the file", Simple(&g), absl::StatusCode::kDataLoss, "claims"});
  }
  {
    GgufBuilder g;
    std::string kv;
    const uint64_t klen = 3;
    kv.append(reinterpret_cast<const char*>(&klen), 8);
    kv += "arr";
    const uint32_t t = 9, item = 4;
    const uint64_t n = 1ull << 40;
    kv.append(reinterpret_cast<const char*>(&t), 4);
    kv.append(reinterpret_cast<const char*>(&item), 4);
    kv.append(reinterpret_cast<const char*>(&n), 8);
    g.RawKv(kv);
    cases.push_back({"array longer than the file", Simple(&g), absl::StatusCode::kDataLoss, "does not fit"});
  }
  {
    GgufBuilder g;
    std::string kv;
    const uint64_t klen = 1;
    kv.append(reinterpret_cast<const char*>(&klen), 8);
    kv += "k";
    const uint32_t t = 13;
    kv.append(reinterpret_cast<const char*>(&t), 4);
    g.RawKv(kv);
    cases.push_back({"unknown value type", Simple(&g), absl::StatusCode::kDataLoss, "unknown value type 13"});
  }
  {
    GgufBuilder g;
    g.U32("llama.block_count", 3);  // Simple adds it again
    cases.push_back({"duplicate key", Simple(&g), absl::StatusCode::kDataLoss, "appears twice"});
  }
  {
    GgufBuilder g;
    g.AddTensor({"q", {32, 2}, 16, std::string(64, '\0')});
    cases.push_back({"unsupported tensor type", Simple(&g), absl::StatusCode::kInvalidArgument, "IQ2_XXS"});
  }
  {
    GgufBuilder g;
    g.AddTensor({"q", {20, 2}, 2, std::string(36, '\0')});
    cases.push_back({"row not a multiple of the block", Simple(&g), absl::StatusCode::kDataLoss, "not a multiple"});
  }
  {
    GgufBuilder g;
    g.AddTensor({"far", {4}, 0, std::string(16, '\0'), 1 << 20});
    cases.push_back({"offset out of range", Simple(&g), absl::StatusCode::kDataLoss, "outside"});
  }
  {
    GgufBuilder g;
    g.AddTensor({"overlap", {4}, 0, std::string(16, '\0'), 32});  // where "w" lies
    cases.push_back({"overlapping tensors", Simple(&g), absl::StatusCode::kDataLoss, "overlap"});
  }
  {
    GgufBuilder g;
    g.AddTensor({"odd", {4}, 0, std::string(16, '\0'), 4});
    cases.push_back({"misaligned offset", Simple(&g), absl::StatusCode::kDataLoss, "not aligned"});
  }
  {
    GgufBuilder g;
    g.AddTensor({"zero", {0, 4}, 0, ""});
    cases.push_back({"zero dimension", Simple(&g), absl::StatusCode::kDataLoss, "dimension 0"});
  }
  {
    GgufBuilder g;
    g.AddTensor({"big", {1ull << 30, 1ull << 30}, 0, ""});
    cases.push_back({"overflowing shape", Simple(&g), absl::StatusCode::kDataLoss, "overflowing"});
  }
  {
    GgufBuilder g;
    g.AddF32("w", {1}, {0});  // Simple adds "w" again
    cases.push_back({"duplicate tensor", Simple(&g), absl::StatusCode::kDataLoss, "appears twice"});
  }
  {
    GgufBuilder g;
    g.alignment = 48;
    cases.push_back({"alignment not a power of two", Simple(&g), absl::StatusCode::kDataLoss, "alignment"});
  }
  return cases;
}

TEST(GgufTest, LyingOrTruncatedFilesAreRefusedBeforeAnyRead) {
  TempDir dir;
  for (const BadCase& c : BadFiles()) {
    WriteFile(dir.File("bad.gguf"), c.bytes);
    auto f = GgufFile::Open(dir.File("bad.gguf"));
    ASSERT_FALSE(f.ok()) << c.what;
    EXPECT_EQ(f.status().code(), c.code) << c.what << ": " << f.status();
    EXPECT_NE(f.status().message().find(c.message), std::string::npos) << c.what << ": " << f.status();
    EXPECT_EQ(f.status().message().find('\n'), std::string::npos) << c.what;
  }
  EXPECT_EQ(GgufFile::Open(dir.File("missing.gguf")).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ferry::io
