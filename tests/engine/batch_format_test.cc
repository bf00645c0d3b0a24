// Batch formats: OpenAI Batch requests in (every field read), records out (every field written),
// requests ferry cannot serve named, shard partitions (disjoint, complete, stable, balanced), and
// shards from Slurm's and Kubernetes' environment.
#include "engine/batch_format.h"

#include <cstdlib>
#include <set>

#include "engine/jobs.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using nlohmann::json;

RequestParams Defaults() {
  RequestParams p;
  p.max_tokens = 9;
  p.temperature = 0.0f;
  p.stop = {"\n\n"};
  return p;
}

TEST(BatchFormatTest, DetectsTheFormatFromTheFirstLine) {
  EXPECT_EQ(DetectBatchFormat(R"({"custom_id": "a", "method": "POST"})"), BatchFormat::kOpenAI);
  EXPECT_EQ(DetectBatchFormat(R"({"id": 1, "prompt": "x"})"), BatchFormat::kFerry);
  EXPECT_EQ(DetectBatchFormat("not json"), BatchFormat::kFerry);  // and the ferry parser names the line
  EXPECT_FALSE(ParseBatchFormat("csv").ok());
}

TEST(BatchFormatTest, CompletionRequestEveryField) {
  auto r = ParseBatchRequest(
      R"({"custom_id": "req-1", "method": "POST", "url": "/v1/completions",
          "body": {"model": "m-7b", "prompt": "Once", "max_tokens": 17, "min_tokens": 2, "temperature": 0.7, "top_p": 0.9,
                   "top_k": 40, "seed": 12345, "stop": ["END", "\n"], "n": 1, "stream": false, "logprobs": null,
                   "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u"}})",
      BatchFormat::kOpenAI, 3, Defaults());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->error.empty()) << r->error;
  EXPECT_EQ(r->kind, BatchRequest::kCompletion);
  EXPECT_EQ(r->key, "req-1");
  EXPECT_EQ(r->prompt, "Once");
  EXPECT_EQ(r->model, "m-7b");
  EXPECT_EQ(r->params.max_tokens, 17);
  EXPECT_EQ(r->params.min_tokens, 2);
  EXPECT_FLOAT_EQ(r->params.temperature, 0.7f);
  EXPECT_FLOAT_EQ(r->params.top_p, 0.9f);
  EXPECT_EQ(r->params.top_k, 40);
  ASSERT_TRUE(r->params.seed.has_value());
  EXPECT_EQ(*r->params.seed, 12345u);
  EXPECT_EQ(r->params.stop, (std::vector<std::string>{"END", "\n"}));

  // Defaults where the body is silent; a list of one prompt; token ids.
  auto d = ParseBatchRequest(R"({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["Hi"]}})",
                             BatchFormat::kOpenAI, 0, Defaults());
  ASSERT_TRUE(d.ok() && d->error.empty());
  EXPECT_EQ(d->prompt, "Hi");
  EXPECT_EQ(d->params.max_tokens, 9);
  EXPECT_EQ(d->params.stop, (std::vector<std::string>{"\n\n"}));
  EXPECT_FALSE(d->params.seed.has_value());
  auto ids = ParseBatchRequest(R"({"custom_id": "y", "method": "POST", "url": "/v1/completions", "body": {"prompt": [2, 100, 7]}})",
                               BatchFormat::kOpenAI, 0, Defaults());
  ASSERT_TRUE(ids.ok() && ids->error.empty());
  EXPECT_EQ(ids->prompt_ids, (std::vector<int>{2, 100, 7}));
}

TEST(BatchFormatTest, ChatRequestKeepsMessagesInOrder) {
  auto r = ParseBatchRequest(
      R"({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
          "body": {"messages": [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"z": 1, "a": 2}}}]}],
                   "max_completion_tokens": 5}})",
      BatchFormat::kOpenAI, 0, Defaults());
  ASSERT_TRUE(r.ok() && r->error.empty()) << r->error;
  EXPECT_EQ(r->kind, BatchRequest::kChat);
  EXPECT_EQ(r->params.max_tokens, 5);
  ASSERT_EQ(r->messages.size(), 3u);
  EXPECT_EQ(r->messages[1]["content"], "ab");
  EXPECT_TRUE(r->messages[2]["content"].is_null());
  EXPECT_EQ(r->messages[2]["tool_calls"][0]["function"]["arguments"].dump(), R"({"z":1,"a":2})");  // order kept
}

TEST(BatchFormatTest, RequestsFerryCannotServeAreNamed) {
  const auto error_of = [](const std::string& body, const std::string& url = "/v1/completions") {
    auto r = ParseBatchRequest(R"({"custom_id": "e", "method": "POST", "url": ")" + url + R"(", "body": )" + body + "}",
                               BatchFormat::kOpenAI, 0, Defaults());
    return r.ok() ? r->error : "STATUS " + std::string(r.status().message());
  };
  EXPECT_NE(error_of(R"({"input": "x"})", "/v1/embeddings").find("url \"/v1/embeddings\" is not served"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "n": 2})").find("body.n must be 1"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "stream": true})").find("body.stream is not supported"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "temperature": 3})").find("temperature"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "top_p": 0})").find("top_p"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "max_tokens": -1})").find("max_tokens"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "stop": ""})").find("stop"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "tools": []})").find("body.tools is not supported"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": ["a", "b"]})").find("several prompts"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "frequency_penalty": 0.5})").find("frequency_penalty"), std::string::npos);
  EXPECT_NE(error_of(R"({"messages": [{"role": "user", "content": "x"}]})").find("body.messages is for /v1/chat/completions"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"messages": [{"content": "x"}]})", "/v1/chat/completions").find("role"), std::string::npos);
  EXPECT_NE(error_of(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", "/v1/chat/completions")
                .find("only text parts"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"prompt": "x", "max_tokens": 3, "min_tokens": 5})").find("min_tokens"), std::string::npos);
  // Not requests at all: the job fails on them whatever --on-bad-request says.
  EXPECT_FALSE(ParseBatchRequest("[1, 2]", BatchFormat::kOpenAI, 0, {}).ok());
  EXPECT_FALSE(ParseBatchRequest(R"({"method": "POST"})", BatchFormat::kOpenAI, 0, {}).ok());
  EXPECT_FALSE(ParseBatchRequest(R"({"id": 1})", BatchFormat::kFerry, 0, {}).ok());
  EXPECT_FALSE(ParseBatchRequest(std::string(100, '[') + std::string(100, ']'), BatchFormat::kFerry, 0, {}).ok());
}

TEST(BatchFormatTest, OutputRecordsEveryField) {
  auto r = ParseBatchRequest(R"({"custom_id": "req-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "P"}})",
                             BatchFormat::kOpenAI, 0, Defaults());
  ASSERT_TRUE(r.ok());
  Completion c{"the text", {5, 6, 7}, "eos", 4};
  const json rec = json::parse(CompletionRecord(BatchFormat::kOpenAI, *r, c, "tiny-opt", 1700000000));
  EXPECT_EQ(rec["custom_id"], "req-1");
  ASSERT_TRUE(rec["id"].is_string());
  const std::string h = rec["id"].get<std::string>().substr(10);
  EXPECT_EQ(rec["id"], "batch_req_" + h);
  EXPECT_TRUE(rec["error"].is_null());
  EXPECT_EQ(rec["response"]["status_code"], 200);
  EXPECT_EQ(rec["response"]["request_id"], h);
  const json& body = rec["response"]["body"];
  EXPECT_EQ(body["id"], "cmpl-" + h);
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["created"], 1700000000);
  EXPECT_EQ(body["model"], "tiny-opt");
  ASSERT_EQ(body["choices"].size(), 1u);
  EXPECT_EQ(body["choices"][0]["index"], 0);
  EXPECT_EQ(body["choices"][0]["text"], "the text");
  EXPECT_TRUE(body["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");  // EOS is "stop" in OpenAI's words
  EXPECT_EQ(body["usage"], json({{"prompt_tokens", 4}, {"completion_tokens", 3}, {"total_tokens", 7}}));
  EXPECT_EQ(*RecordKey(rec.dump(), BatchFormat::kOpenAI), "req-1");

  r->kind = BatchRequest::kChat;
  r->model = "asked-for";
  c.finish_reason = "length";
  const json chat = json::parse(CompletionRecord(BatchFormat::kOpenAI, *r, c, "tiny-opt", 5));
  EXPECT_EQ(chat["response"]["body"]["object"], "chat.completion");
  EXPECT_EQ(chat["response"]["body"]["id"], "chatcmpl-" + h);
  EXPECT_EQ(chat["response"]["body"]["model"], "asked-for");
  EXPECT_EQ(chat["response"]["body"]["choices"][0]["message"], json({{"role", "assistant"}, {"content", "the text"}}));
  EXPECT_EQ(chat["response"]["body"]["choices"][0]["finish_reason"], "length");

  const json err = json::parse(ErrorRecord(BatchFormat::kOpenAI, *r, "no such url"));
  EXPECT_EQ(err["custom_id"], "req-1");
  EXPECT_EQ(err["response"]["status_code"], 400);
  EXPECT_EQ(err["response"]["body"]["error"]["message"], "no such url");
  EXPECT_EQ(err["response"]["body"]["error"]["type"], "invalid_request_error");
  EXPECT_EQ(*RecordKey(err.dump(), BatchFormat::kOpenAI), "req-1");

  // Another custom_id, another id; the same one, the same id (reruns write the same bytes).
  auto other = ParseBatchRequest(R"({"custom_id": "req-2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "P"}})",
                                 BatchFormat::kOpenAI, 0, Defaults());
  EXPECT_NE(json::parse(CompletionRecord(BatchFormat::kOpenAI, *other, c, "m", 0))["id"], rec["id"]);

  auto f = ParseBatchRequest(R"({"id": {"k": [1]}, "prompt": "P"})", BatchFormat::kFerry, 0, Defaults());
  ASSERT_TRUE(f.ok());
  const json fr = json::parse(CompletionRecord(BatchFormat::kFerry, *f, c, "m", 0));
  EXPECT_EQ(fr, json({{"id", {{"k", {1}}}}, {"prompt", "P"}, {"completion", "the text"}, {"token_ids", {5, 6, 7}}, {"finish_reason", "length"}}));
  EXPECT_EQ(*RecordKey(fr.dump(), BatchFormat::kFerry), R"({"k":[1]})");
  EXPECT_FALSE(RecordKey(R"({"id": 1})", BatchFormat::kFerry).ok());
  EXPECT_FALSE(RecordKey(R"({"custom_id": "a"})", BatchFormat::kOpenAI).ok());
  auto noid = ParseBatchRequest(R"({"prompt": "P"})", BatchFormat::kFerry, 41, Defaults());
  EXPECT_EQ(noid->key, "41");  // a line without an id is known by its index
}

TEST(BatchFormatTest, StopFindsTheEarliestMatch) {
  EXPECT_EQ(FindStop("abc END def\n", {"\n", "END"}), 4u);
  EXPECT_EQ(FindStop("abc", {"x"}), std::string::npos);
  EXPECT_EQ(FindStop("abc", {}), std::string::npos);
}

TEST(ShardTest, EveryRecordInExactlyOneShardStableAndBalanced) {
  for (bool by_id : {false, true}) {
    for (int64_t n : {1, 2, 3, 4, 7}) {
      std::vector<int> owners(1000, 0), count(static_cast<size_t>(n), 0);
      for (int64_t i = 0; i < n; ++i) {
        const Shard s{i, n, by_id};
        for (int r = 0; r < 1000; ++r) {
          const std::string key = "req-" + std::to_string(r);
          if (InShard(s, r, key)) {
            ++owners[static_cast<size_t>(r)];
            ++count[static_cast<size_t>(i)];
            EXPECT_TRUE(InShard(s, r, key));  // the same answer every time
          }
        }
      }
      for (int r = 0; r < 1000; ++r) EXPECT_EQ(owners[static_cast<size_t>(r)], 1) << "record " << r << " of " << n << " shards";
      for (int c : count) EXPECT_NEAR(c, 1000.0 / static_cast<double>(n), by_id ? 0.25 * 1000.0 / static_cast<double>(n) : 1.0);
    }
  }
  // By id, a record's shard does not depend on where it sits in the input.
  EXPECT_EQ(InShard({1, 4, true}, 0, "k"), InShard({1, 4, true}, 999, "k"));
  EXPECT_EQ(ShardOutputPath("out.jsonl", {2, 4, false}), "out.jsonl.shard-00002-of-00004");
  EXPECT_EQ(ShardOutputPath("out.jsonl", {0, 1, false}), "out.jsonl");
}

class ShardEnvTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (const char* v : {"SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                          "JOB_COMPLETION_INDEX", "FERRY_SHARD_COUNT"}) {
      unsetenv(v);
    }
  }
};

TEST_F(ShardEnvTest, FromSlurmAndKubernetes) {
  TearDown();
  auto none = ParseShard("auto");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->count, 1);
  setenv("SLURM_ARRAY_TASK_ID", "7", 1);
  setenv("SLURM_ARRAY_TASK_COUNT", "4", 1);
  setenv("SLURM_ARRAY_TASK_MIN", "1", 1);
  setenv("SLURM_ARRAY_TASK_STEP", "2", 1);  // --array=1-7:2: tasks 1, 3, 5, 7
  auto slurm = ParseShard("auto");
  ASSERT_TRUE(slurm.ok()) << slurm.status();
  EXPECT_EQ(slurm->index, 3);
  EXPECT_EQ(slurm->count, 4);
  auto given = ParseShard("1/3");  // a flag wins over the environment
  ASSERT_TRUE(given.ok());
  EXPECT_EQ(given->index, 1);
  EXPECT_EQ(given->count, 3);
  setenv("SLURM_ARRAY_TASK_ID", "9", 1);
  EXPECT_FALSE(ParseShard("auto").ok());  // out of range: refused, not guessed
  TearDown();
  setenv("JOB_COMPLETION_INDEX", "2", 1);
  EXPECT_FALSE(ParseShard("auto").ok());  // the count must be given
  setenv("FERRY_SHARD_COUNT", "5", 1);
  auto k8s = ParseShard("auto");
  ASSERT_TRUE(k8s.ok()) << k8s.status();
  EXPECT_EQ(k8s->index, 2);
  EXPECT_EQ(k8s->count, 5);
  for (const char* bad : {"3/3", "-1/2", "1/0", "a/b", "1", "1/2/3"}) EXPECT_FALSE(ParseShard(bad).ok()) << bad;
}

}  // namespace
}  // namespace ferry::engine
