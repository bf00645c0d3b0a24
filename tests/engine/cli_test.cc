// The `ferry` binary as a user runs it: outputs, exit codes, and one clear line on bad input.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <algorithm>
#include <fstream>
#include <string>

#include "base/file.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "cli_util.h"
#include "test_util.h"

namespace {

using ferry::testing::Ferry;
using ferry::testing::kModel;
using ferry::testing::Lines;
using ferry::testing::Result;


TEST(CliTest, GenerateOnePromptGreedy) {
  Result r = Ferry("generate " + kModel + " --prompt 'In the beginning God created' --max-new-tokens 8 -q");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, " it, and the word of the LORD\n");
  EXPECT_EQ(r.err, "");
}

TEST(CliTest, GenerateJsonlJob) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"),
                            "{\"id\": \"a\", \"prompt\": \"In the beginning God created\"}\n\n"
                            "{\"id\": 7, \"prompt\": \"ROMEO:\\nWhat light\"}\n{\"prompt\": \"To be\"}\n");
  Result r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File("out.jsonl") +
                " --max-new-tokens 6 --batch-size 2");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("3/3 records"), std::string::npos) << r.err;  // progress
  std::ifstream in(dir.File("out.jsonl"));
  std::vector<nlohmann::json> recs;
  for (std::string line; std::getline(in, line);) recs.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_EQ(recs[0]["id"], "a");
  EXPECT_EQ(recs[1]["id"], 7);
  EXPECT_EQ(recs[2]["id"], 2);  // no id: its index
  EXPECT_EQ(recs[0]["completion"], " it, and the word of");
  EXPECT_EQ(recs[0]["token_ids"].size(), 6u);
  EXPECT_EQ(recs[0]["finish_reason"], "length");
  EXPECT_EQ(recs[1]["prompt"], "ROMEO:\nWhat light");
  for (const auto& rec : recs) {
    for (const char* key : {"id", "prompt", "completion", "token_ids", "finish_reason"}) EXPECT_TRUE(rec.contains(key));
  }
}

TEST(CliTest, JsonlJobResumesAndNeverOverwritesSilently) {
  ferry::testing::TempDir dir;
  std::string input;
  for (int i = 0; i < 5; ++i) input += "{\"id\": \"p" + std::to_string(i) + "\", \"prompt\": \"And God said " + std::to_string(i) + "\"}\n";
  ferry::testing::WriteFile(dir.File("in.jsonl"), input);
  const std::string job = "generate " + kModel + " --input " + dir.File("in.jsonl") + " --max-new-tokens 5 --batch-size 2 " +
                          "--temperature 0.9 --seed 11 -q --output ";
  Result r = Ferry(job + dir.File("full.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string full = ferry::ReadFileToString(dir.File("full.jsonl")).value();
  ASSERT_EQ(Lines(full), 5);

  // Killed while writing the fourth record: three complete lines and a torn one.
  size_t cut = 0;
  for (int i = 0; i < 3; ++i) cut = full.find('\n', cut) + 1;
  const std::string torn = full.substr(0, cut) + full.substr(cut, 17);
  ferry::testing::WriteFile(dir.File("out.jsonl"), torn);

  // Without --resume an existing output is refused, and left as it was.
  r = Ferry(job + dir.File("out.jsonl"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("already holds output; pass --resume"), std::string::npos) << r.err;
  EXPECT_EQ(ferry::ReadFileToString(dir.File("out.jsonl")).value(), torn);

  // Resumed: the torn line goes, the rest is generated, and the file is what one run wrote
  // (sampling streams are per input index, not per batch).
  r = Ferry(job + dir.File("out.jsonl") + " --resume");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(ferry::ReadFileToString(dir.File("out.jsonl")).value(), full);
  r = Ferry(job + dir.File("out.jsonl") + " --resume");  // complete: nothing to do
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(ferry::ReadFileToString(dir.File("out.jsonl")).value(), full);

  // An output of another input is not resumed; --overwrite replaces.
  ferry::testing::WriteFile(dir.File("other.jsonl"), "{\"id\": \"x\", \"prompt\": \"Hi\"}\n");
  r = Ferry("generate " + kModel + " --input " + dir.File("other.jsonl") + " --output " + dir.File("out.jsonl") + " --resume -q");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("belongs to another input"), std::string::npos) << r.err;
  EXPECT_EQ(ferry::ReadFileToString(dir.File("out.jsonl")).value(), full);
  r = Ferry("generate " + kModel + " --input " + dir.File("other.jsonl") + " --output " + dir.File("out.jsonl") + " --overwrite -q");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Lines(ferry::ReadFileToString(dir.File("out.jsonl")).value()), 1);
}

TEST(CliTest, BadJsonlLineFailsBeforeAnyWorkWithItsLineNumber) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"), "{\"prompt\": \"ok\"}\n{\"prompt\": 5}\n");
  Result r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File("o.jsonl"));
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(Lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find("in.jsonl:2:"), std::string::npos) << r.err;
  EXPECT_EQ(ferry::ReadFileToString(dir.File("o.jsonl")).status().code(), absl::StatusCode::kNotFound);
  // A prompt longer than the context.
  std::string long_prompt;
  for (int i = 0; i < 600; ++i) long_prompt += " and";
  ferry::testing::WriteFile(dir.File("long.jsonl"), "{\"prompt\": \"" + long_prompt + "\"}\n");
  r = Ferry("generate " + kModel + " --input " + dir.File("long.jsonl"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("longer than the model's context of 512"), std::string::npos) << r.err;
}

TEST(CliTest, TokenizePrintsJsonIds) {
  Result r = Ferry("tokenize " + kModel + " --text 'Hello world'");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "[2,43,7950,1095]\n");
}

TEST(CliTest, PplJson) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("t.txt"), "In the beginning God created the heaven and the earth.\r\n");
  Result r = Ferry("ppl " + kModel + " --text " + dir.File("t.txt") + " --window 8 --json -q");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_GT(j["perplexity"].get<double>(), 1.0);
  EXPECT_EQ(j["window"], 8);
  // F16 keys and values: nearly the same perplexity, not bitwise (the values are rounded).
  Result r16 = Ferry("ppl " + kModel + " --text " + dir.File("t.txt") + " --window 8 --json -q --kv-dtype f16");
  ASSERT_EQ(r16.code, 0) << r16.err;
  const double p32 = j["perplexity"].get<double>(), p16 = nlohmann::json::parse(r16.out)["perplexity"].get<double>();
  EXPECT_NEAR(p16, p32, p32 * 1e-3);
  EXPECT_EQ(Ferry("ppl " + kModel + " --text " + dir.File("t.txt") + " --kv-dtype bf16").code, 2);
}

TEST(CliTest, ErrorsAreOneClearLine) {
  Result r = Ferry("generate --bogus-flag");
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(Lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find("bogus-flag"), std::string::npos);

  r = Ferry("generate --model /nonexistent-ferry --prompt hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "ferry: error: model directory /nonexistent-ferry does not exist\n");

  r = Ferry("ppl " + kModel + " --text /nonexistent-file.txt");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(Lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find("no such file"), std::string::npos);

  r = Ferry("generate " + kModel + " --prompt hi --top-p 2");
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(Lines(r.err), 1) << r.err;

  r = Ferry("generate " + kModel);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--prompt or --input"), std::string::npos);

  r = Ferry("generate " + kModel + " --prompt hi --sparsity-cache 0.3");  // needs --sparsity and --weights
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--sparsity-cache needs"), std::string::npos) << r.err;

  r = Ferry("sparsity train --data /nonexistent-ferry-data --out /tmp/x --device cuda");
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(Lines(r.err), 1) << r.err;

  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("config.json"), "{\"model_type\": \"opt\", ");
  r = Ferry("generate --model " + dir.path() + " --prompt hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(Lines(r.err), 1) << r.err;
}

TEST(CliTest, HelpForEveryCommand) {
  for (const char* cmd : {"", "generate ", "tokenize ", "ppl ", "convert ", "verify ", "bench "}) {
    Result r = Ferry(std::string(cmd) + "--help");
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_NE(r.out.find("--"), std::string::npos) << cmd;
  }
  EXPECT_EQ(Ferry("").code, 2);
}

}  // namespace

namespace {

TEST(CliTest, ConvertVerifyAndOffloadedGenerate) {
  ferry::testing::TempDir dir;
  const std::string store = dir.File("store");
  Result r = Ferry("convert " + kModel + " --out " + store + " --verify");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("100%"), std::string::npos) << r.err;  // progress
  r = Ferry("verify --store " + store + " -q");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("every checksum matches"), std::string::npos);
  r = Ferry("convert " + kModel + " --out " + store + " -q");
  EXPECT_EQ(r.code, 1);  // refuses to overwrite
  const std::string prompt = " --prompt 'In the beginning God created' --max-new-tokens 8 -q";
  Result resident = Ferry("generate " + kModel + prompt);
  Result offloaded = Ferry("generate --model " + store + " --weights 0,30,70" + prompt);
  ASSERT_EQ(offloaded.code, 0) << offloaded.err;
  EXPECT_EQ(offloaded.out, resident.out);
  r = Ferry("generate --model " + store + " --weights 100,0,0 --gpu-mem 2MiB" + prompt);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("over by"), std::string::npos) << r.err;
  r = Ferry("generate " + kModel + " --weights 0,50,50" + prompt);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("ferry convert"), std::string::npos) << r.err;
  r = Ferry("generate --model " + store + " --weights 50,50" + prompt);
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(Lines(r.err), 1) << r.err;
}

TEST(CliTest, BenchPrintsFlexGenMetrics) {
  ferry::testing::TempDir dir;
  Result r = Ferry("bench " + kModel + " --store " + dir.File("s") + " --weights 0,50,50 --prompt-len 16 --gen-len 4 " +
                   "--gpu-batch-size 2 --json " + dir.File("b.json") + " -q");
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* key : {"prefill", "decode", "throughput", "floor per step", "achieved/floor"}) {
    EXPECT_NE(r.out.find(key), std::string::npos) << key;
  }
  auto j = nlohmann::json::parse(*ferry::ReadFileToString(dir.File("b.json")));
  EXPECT_EQ(j["batch"], 2);
  r = Ferry("bench " + kModel + " --store " + dir.File("s") + " --kv cpu --prompt-len 16 --gen-len 3 -q");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("full, on the CPU"), std::string::npos) << r.out;
  r = Ferry("bench " + kModel + " --store " + dir.File("s") + " --kv cpu --h2o 4,4 --prompt-len 16 --gen-len 3 -q");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("h2o 4+4, on the CPU"), std::string::npos) << r.out;
  r = Ferry("bench " + kModel + " --store " + dir.File("s") + " --weights 0,100,0 --sparsity-sim 0.2 --prompt-len 16 --gen-len 3 -q");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("sparse FFN"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("layers run dense"), std::string::npos) << r.out;
  // Flags that exclude each other or are out of range: a one-line error, exit 2.
  EXPECT_EQ(Ferry("bench " + kModel + " --store " + dir.File("s") + " --sparsity-sim 0.2 --sparsity /x -q").code, 2);
  EXPECT_EQ(Ferry("bench " + kModel + " --store " + dir.File("s") + " --sparsity-sim 1.5 -q").code, 2);
  // A context too short for prompt + gen: exit 1.
  EXPECT_EQ(Ferry("bench " + kModel + " --store " + dir.File("s") + " --kv cpu --h2o 4,4 --prompt-len 5000 -q").code, 1);
  EXPECT_EQ(Ferry("bench --dummy opt-7b --store " + dir.File("d") + " -q").code, 1);
}

// A Llama-family checkpoint (a golden: GQA, bf16, q/k norm) through every command: a JSONL job
// gives the same text as one prompt at a time (batch invariance), ppl with the F16 cache is close
// to the F32 one, and the converted store generates the same text from the CPU and disk tiers.
// A GGUF file through the commands: generate gives the text of its HF form, convert makes a store
// that streams the same text offloaded, tokenize --export-json writes a tokenizer.json, and
// --weights on the file itself is refused with the way out.
TEST(CliTest, GgufFileThroughTheCommands) {
  const std::string gguf = ferry::testing::GoldensDir() + "/gguf/llama-gqa.gguf";
  Result hf = Ferry("generate --model " + ferry::testing::GoldensDir() + "/llama-gqa --prompt 'ROMEO:' --max-new-tokens 12 -q");
  ASSERT_EQ(hf.code, 0) << hf.err;
  Result gg = Ferry("generate --model " + gguf + " --gguf-dtype f32 --prompt 'ROMEO:' --max-new-tokens 12 -q");
  ASSERT_EQ(gg.code, 0) << gg.err;
  EXPECT_EQ(gg.out, hf.out);
  ferry::testing::TempDir dir;
  Result conv = Ferry("convert --model " + gguf + " --gguf-dtype f32 --out " + dir.File("store") + " --verify -q");
  ASSERT_EQ(conv.code, 0) << conv.err;
  Result off = Ferry("generate --model " + dir.File("store") + " --weights 0,0,100 --prompt 'ROMEO:' --max-new-tokens 12 -q");
  ASSERT_EQ(off.code, 0) << off.err;
  EXPECT_EQ(off.out, hf.out);
  Result exp = Ferry("tokenize --model " + gguf + " --export-json " + dir.File("tokenizer.json"));
  ASSERT_EQ(exp.code, 0) << exp.err;
  EXPECT_TRUE(nlohmann::json::parse(*ferry::ReadFileToString(dir.File("tokenizer.json"))).contains("model"));
  Result direct = Ferry("generate --model " + gguf + " --weights 0,100,0 --prompt x -q");
  EXPECT_NE(direct.code, 0);
  EXPECT_NE(direct.err.find("convert first"), std::string::npos) << direct.err;
  ferry::testing::WriteFile(dir.File("bad.gguf"), std::string("GGUF\x03\x00\x00\x00", 8) + std::string(20, '\xff'));  // v3, huge counts
  Result bad = Ferry("generate --model " + dir.File("bad.gguf") + " --prompt x -q");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("corrupt GGUF"), std::string::npos) << bad.err;
  EXPECT_EQ(std::count(bad.err.begin(), bad.err.end(), '\n'), 1) << bad.err;
}

TEST(CliTest, LlamaFamilyThroughEveryCommand) {
  const std::string model = "--model " + ferry::testing::GoldensDir() + "/qwen3-yarn";
  Result one = Ferry("generate " + model + " --prompt 'ROMEO:' --max-new-tokens 12 -q");
  ASSERT_EQ(one.code, 0) << one.err;
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"), "{\"id\": 1, \"prompt\": \"In the beginning\"}\n{\"id\": 2, \"prompt\": \"ROMEO:\"}\n");
  Result job = Ferry("generate " + model + " --input " + dir.File("in.jsonl") + " --output " + dir.File("out.jsonl") +
                     " --max-new-tokens 12 --batch-size 2 -q");
  ASSERT_EQ(job.code, 0) << job.err;
  std::ifstream in(dir.File("out.jsonl"));
  std::vector<nlohmann::json> recs;
  for (std::string line; std::getline(in, line);) recs.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[1]["completion"].get<std::string>() + "\n", one.out);
  Result f32 = Ferry("ppl " + model + " --text " + ferry::testing::DataDir() + "/kjv-train-400k.txt --max-tokens 600 --window 100 --json -q");
  Result f16 = Ferry("ppl " + model + " --text " + ferry::testing::DataDir() +
                     "/kjv-train-400k.txt --max-tokens 600 --window 100 --json -q --kv-dtype f16");
  ASSERT_EQ(f32.code, 0) << f32.err;
  ASSERT_EQ(f16.code, 0) << f16.err;
  const double a = nlohmann::json::parse(f32.out)["perplexity"], b = nlohmann::json::parse(f16.out)["perplexity"];
  EXPECT_NEAR(a, b, a * 1e-3);
  Result conv = Ferry("convert " + model + " --out " + dir.File("store") + " --verify -q");
  ASSERT_EQ(conv.code, 0) << conv.err;
  for (const char* split : {"0,100,0", "0,0,100"}) {
    Result off = Ferry("generate --model " + dir.File("store") + " --weights " + split + " --prompt 'ROMEO:' --max-new-tokens 12 -q");
    ASSERT_EQ(off.code, 0) << off.err;
    EXPECT_EQ(off.out, one.out) << split;
  }
  // Deja Vu is refused on a SwiGLU model, offloaded or resident, before the predictors are read.
  for (const std::string& where : {"--model " + dir.File("store") + " --weights 0,100,0", model}) {
    Result sparse = Ferry("generate " + where + " --sparsity /nonexistent --prompt x -q");
    EXPECT_EQ(sparse.code, 1);
    EXPECT_NE(sparse.err.find("needs a ReLU FFN"), std::string::npos) << sparse.err;
  }
}

// Hardening (issue 18): no write is lost with exit 0, the input is never the output, two jobs never
// share an output, and a resumed job never mixes settings.
TEST(CliTest, FailedWritesStopTheJobAndLeaveAResumableFile) {
  ferry::testing::TempDir dir;
  const char* env = std::getenv("FERRY_BINARY");
  const std::string bin = env != nullptr ? env : FERRY_BINARY;
  for (const std::string& to : {std::string(" >/dev/full"), std::string(" --output /dev/full")}) {
    const int st = std::system((bin + " generate " + kModel + " --prompt 'In the' --max-new-tokens 4 -q" + to + " 2>" + dir.File("e")).c_str());
    EXPECT_EQ(WIFEXITED(st) ? WEXITSTATUS(st) : -1, 1) << to;
    EXPECT_NE(ferry::ReadFileToString(dir.File("e")).value_or("").find("No space left"), std::string::npos) << to;
  }
  std::string in;
  for (int i = 0; i < 12; ++i) in += "{\"id\": " + std::to_string(i) + ", \"prompt\": \"In the beginning " + std::to_string(i) + "\"}\n";
  ferry::testing::WriteFile(dir.File("in.jsonl"), in);
  const std::string job = "generate " + kModel + " --input " + dir.File("in.jsonl") + " --max-new-tokens 24 --batch-size 2 -q --output ";
  Result clean = Ferry(job + dir.File("clean.jsonl"));
  ASSERT_EQ(clean.code, 0) << clean.err;
  // A file size limit of 2 KiB stands in for a disk that fills mid-job: the write fails, the job
  // says so, and the file ends at a whole record.
  const std::string cmd = "bash -c 'ulimit -f 2; " + bin + " " + job + dir.File("out.jsonl") + "' 2>" + dir.File("err");
  const int status = std::system(cmd.c_str());
  EXPECT_EQ(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 1);
  const std::string err = ferry::ReadFileToString(dir.File("err")).value_or("");
  EXPECT_NE(err.find("last complete record"), std::string::npos) << err;
  const std::string partial = ferry::ReadFileToString(dir.File("out.jsonl")).value_or("");
  ASSERT_FALSE(partial.empty());
  EXPECT_EQ(partial.back(), '\n');
  EXPECT_LT(partial.size(), 2049u);
  EXPECT_EQ(ferry::ReadFileToString(dir.File("clean.jsonl"))->compare(0, partial.size(), partial), 0);
  Result resumed = Ferry(job + dir.File("out.jsonl") + " --resume");
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  EXPECT_EQ(ferry::ReadFileToString(dir.File("out.jsonl")).value(), ferry::ReadFileToString(dir.File("clean.jsonl")).value());
  // Resuming with other sampling settings is refused, naming the setting.
  Result other = Ferry(job + dir.File("out.jsonl") + " --resume --temperature 0.7");
  EXPECT_EQ(other.code, 1);
  EXPECT_NE(other.err.find("temperature"), std::string::npos) << other.err;
}

TEST(CliTest, TheInputIsNeverTheOutputAndOutputsAreLocked) {
  ferry::testing::TempDir dir;
  const std::string input = "{\"prompt\": \"To be\"}\n";
  ferry::testing::WriteFile(dir.File("in.jsonl"), input);
  ASSERT_EQ(::symlink(dir.File("in.jsonl").c_str(), dir.File("link.jsonl").c_str()), 0);
  for (const char* out : {"in.jsonl", "link.jsonl"}) {
    Result r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File(out) + " --overwrite -q");
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.err.find("is the input"), std::string::npos) << r.err;
    EXPECT_EQ(ferry::ReadFileToString(dir.File("in.jsonl")).value(), input);
  }
  // Another job (here this test) holds the output: refused, nothing written.
  auto held = ferry::RecordFile::Open(dir.File("out.jsonl"));
  ASSERT_TRUE(held.ok());
  Result r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File("out.jsonl") + " -q");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("another ferry job"), std::string::npos) << r.err;
  // A FIFO as a model file is refused rather than blocking forever.
  ASSERT_EQ(::mkfifo(dir.File("fifo").c_str(), 0644), 0);
  EXPECT_FALSE(ferry::ReadFileToString(dir.File("fifo")).ok());
}

// Numbers from the command line: each bad one is one line and exit 1; sizes that mean "all" are
// cut to the context instead of allocating it.
TEST(CliTest, NumbersFromTheCommandLine) {
  const std::string gen = "generate " + kModel + " --prompt 'In the' --max-new-tokens 3 -q ";
  const std::pair<const char*, const char*> bad[] = {
      {"--weights nan,0,100", "not a percentage"}, {"--threads 100000", "more than 1024"},
      {"--gpu-mem 1e30", "larger than any memory"}, {"--gpu-mem 18446744073709551615", "larger than any memory"},
      {"--gpu-mem 0", "is zero"}, {"--cpu-mem 1GiB", "needs --weights"},
      {"--seed 18446744073709551616", "--seed"}, {"--seed -1", "--seed"}};
  for (const auto& [flag, why] : bad) {
    Result r = Ferry(gen + flag);
    EXPECT_EQ(r.code, 1) << flag;
    EXPECT_NE(r.err.find(why), std::string::npos) << flag << ": " << r.err;
    EXPECT_EQ(Lines(r.err), 1) << r.err;
  }
  // "Everything" for a context: the same text as the full cache, and generation up to the context.
  Result full = Ferry(gen);
  ASSERT_EQ(full.code, 0) << full.err;
  for (const char* flag : {"--h2o 100000000,5", "--h2o 2147483647,1"}) {
    Result r = Ferry(gen + flag);
    EXPECT_EQ(r.code, 0) << flag << r.err;
    EXPECT_EQ(r.out, full.out) << flag;
  }
  Result longest = Ferry("generate " + kModel + " --prompt 'In the' --max-new-tokens 2147483647 --ignore-eos --output - -q");
  ASSERT_EQ(longest.code, 0) << longest.err;
  const auto rec = nlohmann::json::parse(longest.out);
  EXPECT_EQ(rec["finish_reason"], "length");
  EXPECT_EQ(rec["token_ids"].size() + 3, 513u);  // prompt (BOS + 2) + new fill the 512 positions, and the last needs none
  Result local = Ferry("ppl " + kModel + " --text " + ferry::testing::DataDir() + "/kjv-train-400k.txt --max-tokens 300 --window 100 -q --local 2000000000");
  EXPECT_EQ(local.code, 0) << local.err;
}

// `ferry verify` refuses a manifest that lost a tensor (a store written before the tables'
// checksum), and a convert that fails (here a 1 MiB file size limit) leaves nothing behind.
TEST(CliTest, VerifyChecksTheModelAndFailedConvertsCleanUp) {
  ferry::testing::TempDir dir;
  ASSERT_EQ(Ferry("convert " + kModel + " --out " + dir.File("s") + " -q").code, 0);
  auto m = nlohmann::json::parse(ferry::ReadFileToString(dir.File("s/manifest.json")).value());
  m.erase("manifest_xxh3");
  auto& t = m["tensors"];
  for (auto it = t.begin(); it != t.end(); ++it) {
    if ((*it)["name"] == "model.decoder.layers.2.fc2.bias") {
      t.erase(it);
      break;
    }
  }
  ferry::testing::WriteFile(dir.File("s/manifest.json"), m.dump());
  Result v = Ferry("verify --store " + dir.File("s") + " -q");
  EXPECT_EQ(v.code, 1);
  EXPECT_NE(v.err.find("lacks tensor \"model.decoder.layers.2.fc2.bias\""), std::string::npos) << v.err;
  const char* env = std::getenv("FERRY_BINARY");
  const std::string bin = env != nullptr ? env : FERRY_BINARY;
  const int st = std::system(("bash -c 'ulimit -f 1024; " + bin + " convert " + kModel + " --out " + dir.File("t") + " -q' 2>/dev/null").c_str());
  EXPECT_NE(WIFEXITED(st) ? WEXITSTATUS(st) : 0, 0);
  EXPECT_FALSE(ferry::PathExists(dir.File("t/weights.bin.tmp")));
  EXPECT_FALSE(ferry::PathExists(dir.File("t/weights.bin")));
  EXPECT_FALSE(ferry::PathExists(dir.File("t/manifest.json")));
}

}  // namespace

namespace ferry::testing {
namespace {

// ferry convert --quantize: says what it did; the store generates what --quantize at load does,
// resident and offloaded; bad flags and mismatched stores fail in one line.
TEST(CliQuantizeTest, ConvertQuantizedThenGenerateOffloaded) {
  TempDir dir;
  const std::string prompt = " --prompt 'In the beginning God created' --max-new-tokens 8 -q";
  Result r = Ferry("convert " + kModel + " --quantize q4 --out " + dir.File("q4"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("layer matrices as q4g64: 36 F16 quantized from their values"), std::string::npos) << r.err;
  const Result at_load = Ferry("generate " + kModel + " --quantize q4" + prompt);
  ASSERT_EQ(at_load.code, 0) << at_load.err;
  r = Ferry("generate --model " + dir.File("q4") + " --weights 0,50,50" + prompt);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, at_load.out);
  r = Ferry("verify --store " + dir.File("q4"));
  EXPECT_EQ(r.code, 0) << r.err;

  r = Ferry("generate " + kModel + " --quantize q4 --weights 0,50,50" + prompt);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("ferry convert --quantize q4"), std::string::npos) << r.err;
  EXPECT_EQ(Lines(r.err), 1) << r.err;
  r = Ferry("convert " + kModel + " --quantize q4 --quant-group 48 --out " + dir.File("bad"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("multiple of the group"), std::string::npos) << r.err;
  EXPECT_FALSE(PathExists(dir.File("bad/manifest.json")));
  r = Ferry("convert " + kModel + " --quantize q3 --out " + dir.File("bad"));
  EXPECT_NE(r.code, 0);
  r = Ferry("generate --model " + dir.File("q4") + " --quantize q8" + prompt);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("already q4g64"), std::string::npos) << r.err;
}

// --kv-dtype q8/q4 through generate, ppl and bench (a quantized store streamed with a q8 cache).
TEST(CliQuantizeTest, QuantizedKvCacheThroughTheCommands) {
  TempDir dir;
  Result r = Ferry("ppl " + kModel + " --text " + DataDir() + "/kjv-val.txt --max-tokens 1024 --kv-dtype q8 --json -q");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  Result f32 = Ferry("ppl " + kModel + " --text " + DataDir() + "/kjv-val.txt --max-tokens 1024 --json -q");
  ASSERT_EQ(f32.code, 0) << f32.err;
  const double a = j["perplexity"].get<double>(), b = nlohmann::json::parse(f32.out)["perplexity"].get<double>();
  EXPECT_NE(a, b);
  EXPECT_NEAR(a, b, b * 1e-3);
  r = Ferry("generate " + kModel + " --kv-dtype q4 --prompt 'In the beginning God created' --max-new-tokens 8 -q");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(r.out.empty());
  r = Ferry("bench " + kModel + " --store " + dir.File("s") + " --quantize q4 --weights 0,100,0 --kv cpu --kv-dtype q8 "
            "--prompt-len 16 --gen-len 3 --json " + dir.File("b.json") + " -q");
  ASSERT_EQ(r.code, 0) << r.err;
  auto b_json = nlohmann::json::parse(*ReadFileToString(dir.File("b.json")));
  EXPECT_EQ(b_json["kv_dtype"], "q8g32");
  EXPECT_EQ(b_json["weights_format"], "q4g64");
  // The store is reused only for the same weights.
  r = Ferry("bench " + kModel + " --store " + dir.File("s") + " --weights 0,100,0 --prompt-len 16 --gen-len 3 -q");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("holds q4g64 layer matrices"), std::string::npos) << r.err;
  r = Ferry("generate " + kModel + " --kv-dtype q2 --prompt x -q");
  EXPECT_NE(r.code, 0);
}

}  // namespace
}  // namespace ferry::testing
