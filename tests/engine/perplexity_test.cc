// Perplexity in the goldens' convention: WikiText-2 test, first 16384 tokens, windows of 512.
#include "engine/perplexity.h"

#include "absl/strings/str_cat.h"
#include "engine/model.h"

#include "base/file.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "kernels/cpu/cpu_backend.h"

namespace ferry::engine {
namespace {

TEST(PerplexityTest, WikiText2MatchesTransformers) {
  kernels::CpuBackend cpu;
  auto model = Model::Load(ferry::testing::ModelDir(), &cpu);
  ASSERT_TRUE(model.ok());
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto raw = ReadFileToString(ferry::testing::DataDir() + "/wiki.test.raw");
  ASSERT_TRUE(raw.ok());
  auto ids = (*tok)->Encode(NormalizeNewlines(*raw));
  ASSERT_TRUE(ids.ok());
  PerplexityOptions o;
  o.window = 512;
  o.max_tokens = 16384;
  auto r = ComputePerplexity(**model, *ids, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->scored_tokens, 32 * 511);
  EXPECT_NEAR(r->perplexity, 6914.08, 6914.08 * 0.001);
}

// tests/data/kjv-val.txt in tiny-opt's tokens (newlines normalized as ferry ppl reads them).
absl::StatusOr<std::vector<int>> KjvValIds() {
  FERRY_ASSIGN_OR_RETURN(auto tok, Tokenizer::FromModelDir(ferry::testing::ModelDir()));
  FERRY_ASSIGN_OR_RETURN(const std::string raw, ReadFileToString(ferry::testing::DataDir() + "/kjv-val.txt"));
  return tok->Encode(NormalizeNewlines(raw));
}

// Issue 15's quality bounds for quantized weights: tiny-opt on kjv-val (4096 tokens, windows of
// 512), q4 group 64 within +1% of the unquantized perplexity (a reference min/max g64 quantization
// measured +0.6%), q8 within +0.1%.
TEST(PerplexityTest, QuantizedWeightsStayWithinTheirBounds) {
  kernels::CpuBackend cpu;
  const absl::StatusOr<std::vector<int>> ids = KjvValIds();
  ASSERT_TRUE(ids.ok()) << ids.status();
  PerplexityOptions o;
  o.window = 512;
  o.max_tokens = 4096;
  const auto ppl = [&](std::optional<QuantFormat> q) {
    GgufLoadOptions lo;
    lo.quantize = q;
    auto model = Model::Load(ferry::testing::ModelDir(), &cpu, lo);
    EXPECT_TRUE(model.ok()) << model.status();
    auto r = ComputePerplexity(**model, *ids, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r->perplexity;
  };
  const double base = ppl(std::nullopt), q4 = ppl(QuantFormat{QuantKind::kQ4, 64}), q8 = ppl(QuantFormat{QuantKind::kQ8, 64});
  EXPECT_NEAR(base, 45.87, 0.05);
  EXPECT_LE(q4, base * 1.01) << "q4g64 " << q4 << " vs " << base;
  EXPECT_GT(q4, base * 1.0005);  // the quantization is really there
  EXPECT_LE(q8, base * 1.001) << "q8g64 " << q8 << " vs " << base;
  // Columns that are not whole groups are refused at load, naming the tensor.
  GgufLoadOptions bad;
  bad.quantize = QuantFormat{QuantKind::kQ4, 96};
  auto refused = Model::Load(ferry::testing::ModelDir(), &cpu, bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(refused.status().message()).find("groups of 96"), std::string::npos) << refused.status();
}

// Issue 15's bounds for compressed KV caches on the same text: q8 keys and values (groups along
// head_dim) within +0.1% of the f32 cache's perplexity, q4 within +1%; the same through H2O with
// 51 heavy + 51 recent slots (against H2O with an f32 cache); f16 stays where it was. Measured:
// 45.8676 -> q8 45.8799 (+0.03%), q4 45.9181 (+0.11%); H2O 47.4950 -> q8 47.4953, q4 47.7843 (+0.61%).
TEST(PerplexityTest, QuantizedKvCachesStayWithinTheirBounds) {
  kernels::CpuBackend cpu;
  const absl::StatusOr<std::vector<int>> ids = KjvValIds();
  ASSERT_TRUE(ids.ok()) << ids.status();
  auto model = Model::Load(ferry::testing::ModelDir(), &cpu);
  ASSERT_TRUE(model.ok());
  const int head_dim = (*model)->config().head_dim();
  const auto ppl = [&](const std::string& kv, bool h2o) {
    PerplexityOptions o;
    o.window = 512;
    o.max_tokens = 4096;
    auto type = ParseKvType(kv, head_dim);
    EXPECT_TRUE(type.ok()) << type.status();
    o.kv_dtype = *type;
    if (h2o) o.h2o = offload::H2OOptions{51, 51, 0};
    auto r = ComputePerplexity(**model, *ids, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->perplexity : 0.0;
  };
  for (const bool h2o : {false, true}) {
    const double base = ppl("f32", h2o), f16 = ppl("f16", h2o), q8 = ppl("q8", h2o), q4 = ppl("q4", h2o);
    const std::string what = h2o ? "h2o 51+51 " : "";
    EXPECT_NEAR(f16, base, base * 1e-4) << what;
    EXPECT_LE(q8, base * 1.001) << what << "q8 " << q8 << " vs " << base;
    EXPECT_NE(q8, base) << what;  // the quantization is really there
    EXPECT_LE(q4, base * 1.01) << what << "q4 " << q4 << " vs " << base;
    EXPECT_GT(std::abs(q4 - base), std::abs(q8 - base)) << what;
    RecordProperty(h2o ? "h2o_ppl_f32" : "ppl_f32", std::to_string(base));
    RecordProperty(h2o ? "h2o_ppl_kv_q8" : "ppl_kv_q8", std::to_string(q8));
    RecordProperty(h2o ? "h2o_ppl_kv_q4" : "ppl_kv_q4", std::to_string(q4));
  }
}

// Deja Vu's bundles of a quantized store (every neuron, so only the bundles' own rounding counts):
// FC1's rows are the store's codes, FC2's columns are requantized along d, so the sparse model's
// perplexity stays near the dense quantized model's: within +0.1% for q8, +1% for q4. Measured:
// q8g64 45.8693 -> 45.8685 (-0.002%), q4g64 46.1789 -> 46.2923 (+0.25%; +0.92% of the unquantized 45.87).
TEST(PerplexityTest, QuantizedBundlesStayNearTheDenseQuantizedModel) {
  const absl::StatusOr<std::vector<int>> ids = KjvValIds();
  ASSERT_TRUE(ids.ok()) << ids.status();
  ferry::testing::TempDir tmp;
  PerplexityOptions o;
  o.window = 512;
  o.max_tokens = 4096;
  for (const char* name : {"q8g64", "q4g64"}) {
    SCOPED_TRACE(name);
    const QuantFormat f = *ParseQuantFormatName(name);
    const std::string dir = tmp.File(name);
    GgufLoadOptions go;
    go.quantize = f;
    ASSERT_TRUE(ConvertModel(ferry::testing::ModelDir(), dir, {}, go).ok());
    const auto ppl = [&](bool sparse) {
      kernels::CpuBackend cpu;
      OffloadOptions off;
      off.split = {0, 100, 0};
      off.sparse_ffn = sparse;
      auto model = Model::LoadOffloaded(dir, &cpu, off);
      EXPECT_TRUE(model.ok()) << model.status();
      if (!model.ok()) return 0.0;
      EXPECT_EQ((*model)->sparse_ffn(), sparse);
      auto r = ComputePerplexity(**model, *ids, o);
      EXPECT_TRUE(r.ok()) << r.status();
      return r.ok() ? r->perplexity : 0.0;
    };
    const double dense = ppl(false), bundled = ppl(true);
    EXPECT_NE(bundled, dense);  // the columns were requantized
    EXPECT_LE(std::abs(bundled / dense - 1.0), f.kind == QuantKind::kQ8 ? 0.001 : 0.01) << bundled << " vs " << dense;
    RecordProperty(absl::StrCat("ppl_dense_", name), std::to_string(dense));
    RecordProperty(absl::StrCat("ppl_bundled_", name), std::to_string(bundled));
  }
}

TEST(PerplexityTest, BatchingWindowsChangesNothingAndBadOptionsAreRefused) {
  kernels::CpuBackend cpu;
  auto model = Model::Load(ferry::testing::ModelDir(), &cpu);
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  auto ids = (*tok)->Encode("Thou shalt not kill. Thou shalt not steal. Honour thy father and thy mother, "
                            "that thy days may be long upon the land which the LORD thy God giveth thee.");
  PerplexityOptions o;
  o.window = 7;
  o.tokens_per_call = 7;
  auto one = ComputePerplexity(**model, *ids, o);
  o.tokens_per_call = 100;
  auto many = ComputePerplexity(**model, *ids, o);
  ASSERT_TRUE(one.ok() && many.ok());
  EXPECT_EQ(one->nll_sum, many->nll_sum);  // bitwise: the kernels are batch invariant
  o.window = 513;
  EXPECT_EQ(ComputePerplexity(**model, *ids, o).status().code(), absl::StatusCode::kInvalidArgument);
  o.window = 512;
  EXPECT_EQ(ComputePerplexity(**model, {2}, o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PerplexityTest, NewlinesAreReadAsPythonTextModeReadsThem) {
  EXPECT_EQ(NormalizeNewlines("a\r\nb\rc\n\r\n"), "a\nb\nc\n\n");
}

}  // namespace
}  // namespace ferry::engine
