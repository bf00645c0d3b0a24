// GGUF tokenizers against llama.cpp's own test vectors: the vocab-only GGUF files llama.cpp ships
// (models/ggml-vocab-*.gguf, with .inp inputs and .out ids from its tokenizer, here as vendored in
// the llama-cpp-python 0.3.36 source package, fetched from PyPI by scripts/fetch-models). Every
// vocabulary ferry reads must give llama.cpp's ids on every input; the ones it refuses must be
// refused with a one-line reason. Encoding as llama.cpp's test does: no BOS, special tokens in the
// text are text unless user-defined.
#include <dirent.h>

#include <cstdio>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/file.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "io/gguf.h"
#include "test_util.h"

namespace ferry::engine {
namespace {

struct VocabResult {
  bool loaded = false;
  std::string refused;
  int cases = 0, passed = 0;
  std::string first_failure;
};

VocabResult RunVocab(const std::string& path) {
  VocabResult r;
  auto file = io::GgufFile::Open(path);
  if (!file.ok()) {
    r.refused = std::string(file.status().message());
    return r;
  }
  auto tok = Tokenizer::FromGguf(**file);
  if (!tok.ok()) {
    r.refused = std::string(tok.status().message());
    return r;
  }
  r.loaded = true;
  const std::string inp = *ReadFileToString(path + ".inp"), outp = *ReadFileToString(path + ".out");
  std::vector<std::string> inputs;
  const std::string sep = "\n__ggml_vocab_test__\n";
  for (size_t pos = 0; pos < inp.size();) {
    const size_t next = inp.find(sep, pos);
    if (next == std::string::npos) {
      inputs.push_back(inp.substr(pos));
      break;
    }
    inputs.push_back(inp.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::vector<std::string> lines = absl::StrSplit(outp, '\n');
  if (!lines.empty() && lines.back().empty()) lines.pop_back();
  EXPECT_EQ(inputs.size(), lines.size()) << path;
  for (size_t i = 0; i < std::min(inputs.size(), lines.size()); ++i) {
    std::vector<int> want;
    for (absl::string_view t : absl::StrSplit(lines[i], ' ', absl::SkipEmpty())) want.push_back(std::stoi(std::string(t)));
    auto got = (*tok)->EncodeNoPrefix(inputs[i]);
    ++r.cases;
    if (got.ok() && *got == want) {
      ++r.passed;
    } else if (r.first_failure.empty()) {
      std::string g;
      if (got.ok()) {
        for (int id : *got) absl::StrAppend(&g, " ", id);
      } else {
        g = std::string(got.status().message());
      }
      r.first_failure = absl::StrCat("input \"", inputs[i], "\": want", lines[i], ", got", g);
    }
  }
  return r;
}

TEST(GgufTokenizerTest, LlamaCppVocabTestVectors) {
  const std::string dir = ferry::testing::CacheDir() + "/models/llama-cpp-vocab";
  ASSERT_TRUE(PathExists(dir + "/.complete")) << dir << " is missing: run scripts/fetch-models (scripts/test does)";
  std::vector<std::string> names;
  DIR* d = opendir(dir.c_str());
  ASSERT_NE(d, nullptr);
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > 9 && n.compare(n.size() - 9, 9, ".gguf.inp") == 0) names.push_back(n.substr(0, n.size() - 4));
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  ASSERT_GE(names.size(), 15u);
  // The vocabularies ferry must read (GPT-2-style byte-level BPE with these pre-tokenizers).
  const std::set<std::string> required = {"ggml-vocab-gpt-2.gguf", "ggml-vocab-llama-bpe.gguf", "ggml-vocab-qwen2.gguf",
                                          "ggml-vocab-starcoder.gguf", "ggml-vocab-refact.gguf", "ggml-vocab-mpt.gguf",
                                          "ggml-vocab-falcon.gguf", "ggml-vocab-command-r.gguf", "ggml-vocab-deepseek-coder.gguf",
                                          "ggml-vocab-qwen35.gguf", "ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf"};
  int loaded = 0;
  for (const std::string& n : names) {
    const VocabResult r = RunVocab(dir + "/" + n);
    if (r.loaded) {
      ++loaded;
      const std::string note = r.passed == r.cases ? "" : absl::StrCat("  first failure: ", r.first_failure);
      std::printf("  %-34s %3d / %3d%s\n", n.c_str(), r.passed, r.cases, note.c_str());
      RecordProperty(n, absl::StrCat(r.passed, "/", r.cases));
    } else {
      std::printf("  %-34s refused: %s\n", n.c_str(), r.refused.c_str());
      EXPECT_EQ(r.refused.find('\n'), std::string::npos) << n;
      EXPECT_FALSE(r.refused.empty()) << n;
    }
    if (required.count(n)) {
      EXPECT_TRUE(r.loaded) << n << ": " << r.refused;
      EXPECT_EQ(r.passed, r.cases) << n << ": " << r.first_failure;
      EXPECT_GE(r.cases, 20) << n;
    }
  }
  EXPECT_GE(loaded, static_cast<int>(required.size()));
}

}  // namespace
}  // namespace ferry::engine
