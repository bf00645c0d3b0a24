// Tokenizer against the golden vectors made by Hugging Face tokenizers, round trips on random
// UTF-8, the vocab.json + merges.txt path, added tokens, parallel chunking and bad input.
#include "engine/tokenizer.h"

#include <fstream>
#include <random>

#include "base/file.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::engine {
namespace {

std::unique_ptr<Tokenizer> Load() {
  auto tok = Tokenizer::FromModelDir(ferry::testing::ModelDir());
  EXPECT_TRUE(tok.ok()) << tok.status();
  return std::move(*tok);
}

TEST(TokenizerTest, GoldenVectorsExactly) {
  auto tok = Load();
  std::ifstream in(ferry::testing::DataDir() + "/goldens.json");
  const auto g = nlohmann::json::parse(in);
  int checked = 0;
  for (const auto& v : g["tokenizer_vectors"]) {
    auto ids = tok->Encode(v["text"].get<std::string>());
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ(*ids, v["ids"].get<std::vector<int>>()) << v["text"];
    ++checked;
  }
  for (const auto& p : g["prompts"]) {
    EXPECT_EQ(*tok->Encode(p["text"].get<std::string>()), p["ids"].get<std::vector<int>>());
    ++checked;
  }
  EXPECT_GE(checked, 6);
  EXPECT_EQ(tok->prefix_ids(), std::vector<int>({2}));
}

TEST(TokenizerTest, VocabAndMergesGiveTheSameIds) {
  auto from_json = Load();
  ferry::testing::TempDir dir;
  for (const char* f : {"vocab.json", "merges.txt", "special_tokens_map.json"}) {
    auto data = ReadFileToString(ferry::testing::ModelDir() + "/" + f);
    ASSERT_TRUE(data.ok());
    ferry::testing::WriteFile(dir.File(f), *data);
  }
  auto from_files = Tokenizer::FromModelDir(dir.path());
  ASSERT_TRUE(from_files.ok()) << from_files.status();
  for (const char* text : {"Thou shalt not kill.\n\nVerily, verily!", "ROMEO:\nWhat light </s> through yonder",
                           "  spaces   and\ttabs\r\n", "naïve café 東京 🙂"}) {
    EXPECT_EQ(*(*from_files)->Encode(text), *from_json->Encode(text)) << text;
  }
}

std::string RandomUtf8(std::mt19937& rng, int chars) {
  // ASCII, Latin-1, Greek, CJK, emoji, combining marks, whitespace of several kinds.
  static const std::vector<std::pair<uint32_t, uint32_t>> ranges = {
      {0x20, 0x7e}, {0x09, 0x0d}, {0xa0, 0xff}, {0x391, 0x3c9}, {0x4e00, 0x4fff},
      {0x1f600, 0x1f64f}, {0x300, 0x36f}, {0x2000, 0x200a}, {0x3000, 0x3000}, {0x10000, 0x10100}};
  std::string s;
  for (int i = 0; i < chars; ++i) {
    const auto& r = ranges[rng() % ranges.size()];
    const uint32_t cp = r.first + rng() % (r.second - r.first + 1);
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xc0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xe0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      s += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      s += static_cast<char>(0xf0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      s += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }
  return s;
}

TEST(TokenizerTest, DecodeOfEncodeIsIdentityOnRandomUtf8) {
  auto tok = Load();
  std::mt19937 rng(42);
  for (int i = 0; i < 300; ++i) {
    const std::string text = RandomUtf8(rng, 1 + static_cast<int>(rng() % 80));
    auto ids = tok->Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    auto back = tok->Decode(*ids);
    ASSERT_TRUE(back.ok());
    ASSERT_EQ(*back, text);
  }
}

TEST(TokenizerTest, SpecialTokensInTextAndDecodeOptions) {
  auto tok = Load();
  auto ids = tok->Encode("a</s>b");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(std::count(ids->begin(), ids->end(), 2), 2);  // BOS and the literal </s>
  EXPECT_EQ(*tok->Decode(*ids), "ab");
  EXPECT_EQ(*tok->Decode(*ids, {.skip_special_tokens = false}), "</s>a</s>b");
  EXPECT_TRUE(tok->IsSpecial(2));
  EXPECT_FALSE(tok->IsSpecial(100));
}

TEST(TokenizerTest, InvalidUtf8InAndOut) {
  auto tok = Load();
  auto bad = tok->Encode(std::string("ok \xff\xfe no"));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("byte 3"), std::string::npos) << bad.status();
  // A token sequence that cuts a character in half decodes with U+FFFD, never invalid UTF-8.
  auto ids = tok->EncodeNoPrefix("東");
  ASSERT_TRUE(ids.ok());
  ASSERT_GE(ids->size(), 2u);
  std::vector<int> half(ids->begin(), ids->end() - 1);
  auto text = tok->Decode(half);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(FindInvalidUtf8(*text), std::string::npos);
  EXPECT_NE(text->find("\xef\xbf\xbd"), std::string::npos);
  EXPECT_EQ(tok->Decode({999999}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TokenizerTest, Utf8Repair) {
  EXPECT_EQ(SanitizeUtf8("abc"), "abc");
  EXPECT_EQ(SanitizeUtf8("a\xe6\x9d"), "a\xef\xbf\xbd");              // truncated 3-byte char: one U+FFFD
  EXPECT_EQ(SanitizeUtf8("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");      // overlong: two
  EXPECT_EQ(SanitizeUtf8("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // surrogate: three
  EXPECT_EQ(FindInvalidUtf8("ok\x80"), 2u);
}

TEST(TokenizerTest, ParallelChunksGiveTheSameIds) {
  auto tok = Load();
  auto text = ReadFileToString(ferry::testing::DataDir() + "/wiki.test.raw");
  ASSERT_TRUE(text.ok());
  auto whole = tok->Encode(*text);
  ASSERT_TRUE(whole.ok());
  tok->set_parallel_chunk_bytes(50000);
  auto chunked = tok->Encode(*text);
  ASSERT_TRUE(chunked.ok());
  EXPECT_EQ(*chunked, *whole);
}

TEST(TokenizerTest, MissingAndMalformedFiles) {
  EXPECT_EQ(Tokenizer::FromModelDir("/nonexistent-ferry").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Tokenizer::FromTokenizerJson("{\"model\": ").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tokenizer::FromTokenizerJson(R"({"model": {"type": "WordPiece"}})").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Every component ferry does not implement is refused by name, in one line.
TEST(TokenizerTest, UnsupportedComponentsAreRefusedByName) {
  const std::string base = *ReadFileToString(ferry::testing::GoldensDir() + "/spm/tokenizer.json");
  const nlohmann::json good = nlohmann::json::parse(base);
  ASSERT_TRUE(Tokenizer::FromTokenizerJson(base).ok());
  struct Case {
    const char* pointer;
    nlohmann::json value;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"/normalizer", {{"type", "Precompiled"}}, "normalizer \"Precompiled\" is not supported"},
      {"/normalizer", {{"type", "Replace"}, {"pattern", {{"Regex", "a+"}}}, {"content", "b"}}, "regex patterns are not supported"},
      {"/decoder", {{"type", "CTC"}}, "decoder \"CTC\" is not supported"},
      {"/pre_tokenizer", {{"type", "Whitespace"}}, "pre-tokenizer \"Whitespace\" is not supported"},
      {"/pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Digits"}}, {{"type", "Metaspace"}}}}}, "Metaspace after"},
      {"/pre_tokenizer", {{"type", "Metaspace"}, {"prepend_scheme", "sometimes"}}, "sometimes"},
      {"/model/type", "Unigram", "must be \"BPE\""},
      {"/model/unk_token", "<nope>", "unk_token"},
      {"/model/dropout", 0.1, "dropout"},
      {"/post_processor", {{"type", "RobertaProcessing"}}, "post_processor.cls"},
      {"/post_processor", {{"type", "SomethingProcessing"}}, "SomethingProcessing"},
      {"/added_tokens/0/single_word", true, "single_word"},
      {"/added_tokens/0/normalized", true, "normalized"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = good;
    j[nlohmann::json::json_pointer(c.pointer)] = c.value;
    auto t = Tokenizer::FromTokenizerJson(j.dump());
    ASSERT_FALSE(t.ok()) << c.pointer << " " << c.value;
    EXPECT_NE(t.status().message().find(c.message), std::string::npos) << c.pointer << ": " << t.status();
    EXPECT_EQ(t.status().message().find('\n'), std::string::npos);
  }
  // A text the vocabulary cannot spell, without byte fallback or unk: an error, not a dropped char.
  nlohmann::json j = good;
  j["model"]["byte_fallback"] = false;
  j["model"]["unk_token"] = nullptr;
  auto t = Tokenizer::FromTokenizerJson(j.dump());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("\xe2\x98\x83 snowman").status().code(), absl::StatusCode::kInvalidArgument);
  // A SentencePiece model that is not one.
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("tokenizer.model"), "not a protobuf at all");
  EXPECT_EQ(Tokenizer::FromModelDir(dir.path()).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::engine
