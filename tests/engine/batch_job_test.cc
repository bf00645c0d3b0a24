// Batch jobs through the `ferry` binary: OpenAI batch files with completion and chat requests,
// stop sequences, bad requests failed up front or recorded, shards merged back to the bytes of a
// single run, merge refusals, kills at several moments resumed to the same bytes, and length
// bucketing that keeps the input order.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace {

using ferry::testing::Ferry;
using ferry::testing::kModel;
using ferry::testing::Lines;
using ferry::testing::Result;
using nlohmann::json;

std::string Read(const std::string& path) { return ferry::ReadFileToString(path).value_or(""); }

std::vector<json> Records(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) out.push_back(json::parse(line));
  return out;
}

// One OpenAI batch line; `body` holds the request's fields besides the prompt or messages.
std::string Request(const std::string& id, const std::string& url, json body) {
  return json({{"custom_id", id}, {"method", "POST"}, {"url", url}, {"body", std::move(body)}}).dump() + "\n";
}
std::string CompletionRequest(const std::string& id, const std::string& prompt, json body = json::object()) {
  body["prompt"] = prompt;
  return Request(id, "/v1/completions", std::move(body));
}

const char* kWords[] = {"In the beginning", "And God said", "Blessed are", "The LORD is my shepherd", "Now the serpent",
                        "And it came to pass", "Let there be", "Thou shalt not"};

// `n` requests of mixed lengths; every third samples (some with their own seed).
std::string MixedInput(int n) {
  std::string in;
  for (int i = 0; i < n; ++i) {
    std::string prompt = kWords[i % 8];
    for (int k = 0; k < i % 5; ++k) absl::StrAppend(&prompt, " ", kWords[(i + k) % 8]);
    json body = {{"max_tokens", 6 + i % 7}};
    if (i % 3 == 1) body["temperature"] = 0.8;
    if (i % 6 == 1) body["seed"] = 1000 + i;
    in += CompletionRequest(absl::StrCat("r", i), prompt, body);
  }
  return in;
}

// tiny-opt with a chat template (SmolLM2's ChatML) in its tokenizer_config.json.
std::string ChatModel(const ferry::testing::TempDir& dir) {
  const std::string m = dir.File("chat-model");
  std::filesystem::create_directory(m);
  for (const auto& e : std::filesystem::directory_iterator(ferry::testing::ModelDir())) {
    if (e.path().filename() != "tokenizer_config.json") std::filesystem::create_symlink(e.path(), m + "/" + e.path().filename().string());
  }
  json config = json::parse(Read(ferry::testing::ModelDir() + "/tokenizer_config.json"));
  config["chat_template"] = Read(ferry::testing::DataDir() + "/chat-templates/smollm2-135m-instruct.jinja");
  ferry::testing::WriteFile(m + "/tokenizer_config.json", config.dump());
  return m;
}

TEST(BatchJobTest, OpenAIBatchWithCompletionsAndChat) {
  ferry::testing::TempDir dir;
  const std::string model = ChatModel(dir);
  const json messages = json::array({{{"role", "user"}, {"content", "Who made the light?"}}});
  const std::string rendered =
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nWho made the light?<|im_end|>\n<|im_start|>assistant\n";
  // The rendered prompt's ids as transformers tokenizes it (no BOS added: the template owns it).
  Result tok = Ferry("tokenize --model " + model + " --no-bos --text '" + rendered + "'");
  ASSERT_EQ(tok.code, 0) << tok.err;
  const json ids = json::parse(tok.out);
  ferry::testing::WriteFile(dir.File("in.jsonl"), CompletionRequest("plain", "In the beginning", {{"max_tokens", 8}}) +
                                                      Request("chat", "/v1/chat/completions", {{"messages", messages}, {"max_tokens", 8}}) +
                                                      Request("as-ids", "/v1/completions", {{"prompt", ids}, {"max_tokens", 8}}));
  Result r = Ferry("generate --model " + model + " --input " + dir.File("in.jsonl") + " --output " + dir.File("out.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto recs = Records(dir.File("out.jsonl"));
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_EQ(recs[0]["custom_id"], "plain");
  EXPECT_EQ(recs[1]["custom_id"], "chat");
  EXPECT_EQ(recs[1]["response"]["body"]["object"], "chat.completion");
  EXPECT_EQ(recs[1]["response"]["body"]["usage"]["prompt_tokens"], ids.size());
  EXPECT_EQ(recs[1]["response"]["body"]["usage"]["completion_tokens"], 8);
  // The chat request ran on exactly the template's tokens.
  EXPECT_EQ(recs[1]["response"]["body"]["choices"][0]["message"]["content"], recs[2]["response"]["body"]["choices"][0]["text"]);
  EXPECT_EQ(recs[0]["response"]["body"]["model"], "chat-model");
  // A model without a chat template cannot serve chat requests: named, with the line.
  Result no = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File("no.jsonl"));
  EXPECT_EQ(no.code, 1);
  EXPECT_NE(no.err.find("in.jsonl:2: the model has no chat template"), std::string::npos) << no.err;
  // A template using what ferry does not run: chat requests name the construct.
  json config = json::parse(Read(model + "/tokenizer_config.json"));
  config["chat_template"] = "{% macro m() %}{% endmacro %}{{ messages[0].content }}";
  std::filesystem::remove(model + "/tokenizer_config.json");
  ferry::testing::WriteFile(model + "/tokenizer_config.json", config.dump());
  Result macro = Ferry("generate --model " + model + " --input " + dir.File("in.jsonl") + " --output " + dir.File("m.jsonl") +
                       " --on-bad-request=record -q");
  ASSERT_EQ(macro.code, 0) << macro.err;
  EXPECT_NE(Records(dir.File("m.jsonl"))[1]["response"]["body"]["error"]["message"].get<std::string>().find(
                "chat template: line 1: the tag 'macro' is not supported"),
            std::string::npos);
  EXPECT_EQ(Records(dir.File("m.jsonl"))[0]["response"]["status_code"], 200);
}

TEST(BatchJobTest, StopSequencesEndTheCompletionBeforeTheMatch) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"), CompletionRequest("a", "And God said", {{"max_tokens", 24}}));
  Result r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File("full.jsonl") + " -q");
  ASSERT_EQ(r.code, 0) << r.err;
  const json full = Records(dir.File("full.jsonl"))[0]["response"]["body"];
  const std::string text = full["choices"][0]["text"];
  ASSERT_GT(text.size(), 12u);
  const std::string stop = text.substr(text.size() / 2, 3);
  const std::string before = text.substr(0, text.find(stop));
  ferry::testing::WriteFile(dir.File("stop.jsonl"), CompletionRequest("a", "And God said", {{"max_tokens", 24}, {"stop", {"zzz", stop}}}));
  r = Ferry("generate " + kModel + " --input " + dir.File("stop.jsonl") + " --output " + dir.File("out.jsonl") + " -q");
  ASSERT_EQ(r.code, 0) << r.err;
  const json cut = Records(dir.File("out.jsonl"))[0]["response"]["body"];
  EXPECT_EQ(cut["choices"][0]["text"], before);
  EXPECT_EQ(cut["choices"][0]["finish_reason"], "stop");
  EXPECT_LT(cut["usage"]["completion_tokens"].get<int>(), 24);  // generation stopped there, too
  // --stop gives the default for ferry's own format.
  ferry::testing::WriteFile(dir.File("f.jsonl"), "{\"id\": 1, \"prompt\": \"And God said\"}\n");
  r = Ferry("generate " + kModel + " --input " + dir.File("f.jsonl") + " --max-new-tokens 24 --stop '" + stop + "' --output " +
            dir.File("f.out") + " -q");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Records(dir.File("f.out"))[0]["completion"], before);
  EXPECT_EQ(Records(dir.File("f.out"))[0]["finish_reason"], "stop");
}

TEST(BatchJobTest, BadRequestsFailUpFrontOrBecomeErrorRecords) {
  ferry::testing::TempDir dir;
  const std::string in = CompletionRequest("ok1", "In the beginning", {{"max_tokens", 4}}) +
                         Request("bad-url", "/v1/embeddings", {{"input", "x"}}) +
                         CompletionRequest("n2", "x", {{"n", 2}}) +
                         CompletionRequest("long", [] {
                           std::string p;
                           for (int i = 0; i < 3000; ++i) p += " and";
                           return p;
                         }(), {{"max_tokens", 4}}) +
                         CompletionRequest("ok2", "And God said", {{"max_tokens", 4}});
  ferry::testing::WriteFile(dir.File("in.jsonl"), in);
  Result r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File("out.jsonl"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("in.jsonl:2: url \"/v1/embeddings\" is not served"), std::string::npos) << r.err;
  EXPECT_EQ(Lines(r.err), 1) << r.err;
  EXPECT_TRUE(Read(dir.File("out.jsonl")).empty());  // nothing generated before the refusal
  r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --output " + dir.File("out.jsonl") + " --on-bad-request=record -q");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto recs = Records(dir.File("out.jsonl"));
  ASSERT_EQ(recs.size(), 5u);
  const int codes[] = {200, 400, 400, 400, 200};
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(recs[i]["response"]["status_code"], codes[i]) << i;
  EXPECT_NE(recs[2]["response"]["body"]["error"]["message"].get<std::string>().find("body.n must be 1"), std::string::npos);
  EXPECT_NE(recs[3]["response"]["body"]["error"]["message"].get<std::string>().find("longer than the model's context"), std::string::npos);
  // Not a request at all, or a custom_id twice: the job fails whatever --on-bad-request says.
  ferry::testing::WriteFile(dir.File("dup.jsonl"), CompletionRequest("a", "x") + CompletionRequest("a", "y"));
  r = Ferry("generate " + kModel + " --input " + dir.File("dup.jsonl") + " --on-bad-request=record --output " + dir.File("d.jsonl"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("dup.jsonl:2: custom_id \"a\" appears twice"), std::string::npos) << r.err;
}

TEST(BatchJobTest, ShardsMergeToTheBytesOfOneRun) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"), MixedInput(30));
  const std::string job = "generate " + kModel + " --input " + dir.File("in.jsonl") + " --batch-size 4 -q";
  Result one = Ferry(job + " --output " + dir.File("one.jsonl"));
  ASSERT_EQ(one.code, 0) << one.err;
  ASSERT_EQ(Lines(Read(dir.File("one.jsonl"))), 30);
  for (const std::string& by : {std::string("index"), std::string("id")}) {
    std::vector<std::string> shards;
    for (int i = 0; i < 3; ++i) {
      Result s = Ferry(absl::StrCat(job, " --shard ", i, "/3 --shard-by ", by, " --output ", dir.File(by + ".jsonl")));
      ASSERT_EQ(s.code, 0) << s.err;
      shards.push_back(dir.File(absl::StrCat(by, ".jsonl.shard-0000", i, "-of-00003")));
      ASSERT_TRUE(ferry::PathExists(shards.back())) << shards.back();
    }
    Result m = Ferry("merge --input " + dir.File("in.jsonl") + " --output " + dir.File("merged-" + by + ".jsonl") + " " + shards[0] + " " +
                     shards[1] + " " + shards[2]);
    ASSERT_EQ(m.code, 0) << m.err;
    EXPECT_EQ(Read(dir.File("merged-" + by + ".jsonl")), Read(dir.File("one.jsonl"))) << by;
  }
  // The environment of a Slurm array task picks the shard.
  const std::string slurm = "SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_COUNT=3 SLURM_ARRAY_TASK_MIN=0 " + ferry::testing::FerryBinary() + " " +
                            job + " --output " + dir.File("env.jsonl");
  ASSERT_EQ(std::system(slurm.c_str()), 0);
  EXPECT_EQ(Read(dir.File("env.jsonl.shard-00001-of-00003")), Read(dir.File("index.jsonl.shard-00001-of-00003")));
}

TEST(BatchJobTest, MergeRefusesMissingDuplicatedAndForeignRecords) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"), MixedInput(12));
  const std::string job = "generate " + kModel + " --input " + dir.File("in.jsonl") + " -q --output " + dir.File("o.jsonl");
  for (int i = 0; i < 3; ++i) ASSERT_EQ(Ferry(absl::StrCat(job, " --shard ", i, "/3")).code, 0);
  const auto shard = [&](int i) { return dir.File(absl::StrCat("o.jsonl.shard-0000", i, "-of-00003")); };
  const std::string merge = "merge --input " + dir.File("in.jsonl") + " --output " + dir.File("m.jsonl") + " ";
  Result r = Ferry(merge + shard(0) + " " + shard(1));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("4 records in no shard: r2, r5, r8, r11"), std::string::npos) << r.err;
  EXPECT_FALSE(ferry::PathExists(dir.File("m.jsonl")));  // a failed merge leaves nothing
  EXPECT_FALSE(ferry::PathExists(dir.File("m.jsonl.tmp")));
  r = Ferry(merge + shard(0) + " " + shard(1) + " " + shard(2) + " " + shard(1));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("4 records in several shards: r1, r4, r7, r10"), std::string::npos) << r.err;
  ferry::testing::WriteFile(dir.File("other.jsonl"), CompletionRequest("stranger", "x", {{"max_tokens", 2}}));
  ASSERT_EQ(Ferry("generate " + kModel + " --input " + dir.File("other.jsonl") + " -q --output " + dir.File("x.jsonl")).code, 0);
  r = Ferry(merge + shard(0) + " " + shard(1) + " " + shard(2) + " " + dir.File("x.jsonl"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("1 records not in the input (or out of its order): stranger"), std::string::npos) << r.err;
  // A shard killed mid-write is refused until it is resumed.
  const std::string s2 = Read(shard(2));
  ferry::testing::WriteFile(shard(2), s2.substr(0, s2.size() - 5));
  r = Ferry(merge + shard(0) + " " + shard(1) + " " + shard(2));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("torn last record"), std::string::npos) << r.err;
  ASSERT_EQ(Ferry(job + " --shard 2/3 --resume").code, 0);
  EXPECT_EQ(Read(shard(2)), s2);
  r = Ferry(merge + shard(0) + " " + shard(1) + " " + shard(2));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Lines(Read(dir.File("m.jsonl"))), 12);
  r = Ferry(merge + shard(0) + " " + shard(1) + " " + shard(2));
  EXPECT_EQ(r.code, 1);  // an existing output is not replaced without --overwrite
  EXPECT_NE(r.err.find("--overwrite"), std::string::npos) << r.err;
}

// Starts `ferry args` and SIGKILLs it once its output has `lines` complete records (0: at once).
void RunAndKill(const std::string& args, const std::string& output, int lines) {
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string cmd = "exec " + ferry::testing::FerryBinary() + " " + args + " 2>/dev/null";
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  ASSERT_GT(pid, 0);
  for (int i = 0; i < 60000 && lines > 0; ++i) {
    if (Lines(Read(output)) >= lines) break;
    int st;
    if (waitpid(pid, &st, WNOHANG) == pid) return;  // finished first
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  kill(pid, SIGKILL);
  int st;
  waitpid(pid, &st, 0);
}

TEST(BatchJobTest, KilledAtAnyMomentResumesToTheSameBytes) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"), MixedInput(40));
  const std::string job = "generate " + kModel + " --input " + dir.File("in.jsonl") + " --batch-size 2 -q --output ";
  ASSERT_EQ(Ferry(job + dir.File("clean.jsonl")).code, 0);
  const std::string clean = Read(dir.File("clean.jsonl"));
  int interrupted = 0;
  for (int at : {0, 1, 7, 20, 33}) {
    const std::string out = dir.File(absl::StrCat("k", at, ".jsonl"));
    RunAndKill(job + out, out, at);
    const std::string partial = Read(out);
    interrupted += partial.size() < clean.size() ? 1 : 0;
    EXPECT_EQ(clean.compare(0, partial.size(), partial), 0) << "killed at " << at;  // a prefix of the clean bytes
    Result r = Ferry(job + out + " --resume");
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(Read(out), clean) << "killed at " << at;
  }
  EXPECT_GE(interrupted, 3);  // most kills landed mid-job
  // A write torn at any byte (a kill inside write(2)) resumes too.
  for (size_t cut : {clean.size() / 3, clean.size() / 2 + 1, clean.size() - 2}) {
    const std::string out = dir.File("torn.jsonl");
    ferry::testing::WriteFile(out, clean.substr(0, cut));
    ferry::testing::WriteFile(out + ".job.json", Read(dir.File("clean.jsonl.job.json")));
    Result r = Ferry(job + out + " --resume");
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(Read(out), clean) << "cut at " << cut;
  }
}

TEST(BatchJobTest, BucketingKeepsTheInputOrderAndTheTexts) {
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("in.jsonl"), MixedInput(24));
  const std::string job = "generate " + kModel + " --input " + dir.File("in.jsonl") + " -q --output ";
  ASSERT_EQ(Ferry(job + dir.File("b1.jsonl") + " --batch-size 1").code, 0);
  Result r = Ferry("generate " + kModel + " --input " + dir.File("in.jsonl") + " --batch-size 5 --output " + dir.File("b5.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto recs = Records(dir.File("b5.jsonl"));
  ASSERT_EQ(recs.size(), 24u);
  for (size_t i = 0; i < recs.size(); ++i) EXPECT_EQ(recs[i]["custom_id"], absl::StrCat("r", i));
  EXPECT_EQ(Read(dir.File("b5.jsonl")), Read(dir.File("b1.jsonl")));  // batches change nothing of a record
  // Progress: records, tokens/s and time left.
  EXPECT_NE(r.err.find("24/24 records"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tok/s"), std::string::npos);
  EXPECT_NE(r.err.find("s left"), std::string::npos);
  // A request's own seed decides its text wherever it sits; without one, its place does.
  const std::string same = CompletionRequest("x", "Blessed are", {{"max_tokens", 12}, {"temperature", 1.0}, {"seed", 7}}) +
                           CompletionRequest("y", "Blessed are", {{"max_tokens", 12}, {"temperature", 1.0}, {"seed", 7}}) +
                           CompletionRequest("z", "Blessed are", {{"max_tokens", 12}, {"temperature", 1.0}});
  ferry::testing::WriteFile(dir.File("seed.jsonl"), same);
  ASSERT_EQ(Ferry("generate " + kModel + " --input " + dir.File("seed.jsonl") + " -q --output " + dir.File("seed.out")).code, 0);
  const auto s = Records(dir.File("seed.out"));
  EXPECT_EQ(s[0]["response"]["body"]["choices"][0]["text"], s[1]["response"]["body"]["choices"][0]["text"]);
  EXPECT_NE(s[0]["response"]["body"]["choices"][0]["text"], s[2]["response"]["body"]["choices"][0]["text"]);
}

}  // namespace
