// ferry's tokenizers against the Hugging Face `tokenizers` package (scripts/make_tokenizer_vectors.py):
// for tiny-opt's tokenizer.json (and a copy with lstrip / rstrip added tokens) and the tokenizer.json ferry writes for GGUF tokenizers (the real
// model SmolLM2, llama.cpp's GPT-2, Llama 3, Qwen2, StarCoder and Falcon vocabularies), 1500
// strings each (random scripts, code, whitespace runs, digits, CJK, emoji, added tokens inside
// text) give the ids `tokenizers` gives, and decode back to the string. Also a SentencePiece
// model alone (tokenizer.model, read with libsentencepiece) against the sentencepiece package, and
// the legacy and Metaspace tokenizer.json conversions of it against tokenizers.
#include <fstream>

#include "base/file.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "io/gguf.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

class TokenizerPeerTest : public ::testing::TestWithParam<const char*> {};

TEST_P(TokenizerPeerTest, IdsEqualHuggingFaceTokenizers) {
  std::ifstream in(ferry::testing::DataDir() + "/tokenizer-vectors/" + GetParam() + ".json");
  ASSERT_TRUE(in.good());
  const nlohmann::json v = nlohmann::json::parse(in);
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok;
  if (v["source"] == "gguf") {
    const std::string path = ferry::testing::CacheDir() + "/" + v["path"].get<std::string>();
    ASSERT_TRUE(PathExists(path)) << path << " is missing: run scripts/fetch-models (scripts/test does)";
    auto file = io::GgufFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    if (v.contains("override")) {  // the exported tokenizer.json with these fields replaced
      nlohmann::json j = nlohmann::json::parse(*TokenizerJsonFromGguf(**file));
      j.update(v["override"]);
      tok = Tokenizer::FromTokenizerJson(j.dump());
    } else {
      tok = Tokenizer::FromGguf(**file);
    }
  } else if (v["source"] == "sentencepiece") {  // a directory with only tokenizer.model
    tok = Tokenizer::FromModelDir(ferry::testing::DataDir() + "/" + v["path"].get<std::string>());
  } else if (v["source"] == "json") {
    tok = Tokenizer::FromTokenizerJson(*ReadFileToString(ferry::testing::DataDir() + "/" + v["path"].get<std::string>()));
  } else if (v.contains("override")) {
    nlohmann::json j = nlohmann::json::parse(*ReadFileToString(ferry::testing::ModelDir() + "/tokenizer.json"));
    j.update(v["override"]);
    tok = Tokenizer::FromTokenizerJson(j.dump());
  } else {
    tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  }
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto& strings = v["strings"];
  const auto& ids = v["ids"];
  ASSERT_EQ(strings.size(), 1500u);
  int wrong = 0, wrong_decode = 0;
  for (size_t i = 0; i < strings.size(); ++i) {
    const std::string s = strings[i].get<std::string>();
    auto got = (*tok)->Encode(s);
    ASSERT_TRUE(got.ok()) << got.status();
    if (*got != ids[i].get<std::vector<int>>()) {
      if (++wrong <= 3) ADD_FAILURE() << "string " << i << " \"" << s << "\": ids " << nlohmann::json(*got) << " want " << ids[i];
    }
    auto body = (*tok)->EncodeNoPrefix(s);
    DecodeOptions keep;
    keep.skip_special_tokens = false;
    if (v.contains("decoded")) {  // the reference's decoding of the ids after BOS
      if (i < v["decoded"].size()) {
        const std::string want = v["decoded"][i].get<std::string>(), got_text = (*tok)->Decode(*body, keep).value();
        if (got_text != want && ++wrong_decode <= 3) ADD_FAILURE() << "string " << i << " decodes to \"" << got_text << "\", want \"" << want << "\"";
      }
    } else if (std::string(GetParam()) != "tiny-opt-strip") {  // stripped whitespace does not come back
      if ((*tok)->Decode(*body, keep).value() != s && ++wrong_decode <= 3) ADD_FAILURE() << "string " << i << " does not decode back";
    }
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(wrong_decode, 0);
}

INSTANTIATE_TEST_SUITE_P(Vectors, TokenizerPeerTest,
                         ::testing::Values("tiny-opt", "tiny-opt-strip", "spm", "spm-metaspace", "spm-model", "smollm2", "gpt-2", "llama3", "qwen2", "starcoder", "falcon", "llama2-spm", "phi-3", "gemma3", "qwen2-nfc", "tiny-opt-nfkc-lower", "tiny-opt-roberta",
                                           "tiny-opt-eos"),
                         [](const auto& info) { return ferry::testing::ParamName(info.param); });

}  // namespace
}  // namespace ferry::engine
