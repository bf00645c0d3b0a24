// The `ferry` binary's policy commands as a user runs them: probe (measured once, cached),
// plan, bench --policy auto / --predict / --sweep with scripts/plot-bench, and generate's auto
// placement of a store that does not fit.
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "base/file.h"
#include "cli_util.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace ferry::testing {
namespace {

// ferry probe: measures, caches per host and backend, reuses the cache until --reprobe; the JSON
// holds every section with positive rates; a disk probe leaves no scratch file behind.
TEST(CliProbeTest, MeasuresOnceThenReusesTheCache) {
  TempDir dir;
  const std::string env = "FERRY_PROBE_DIR=" + dir.File("cache") + " ";
  const std::string cmd = "probe --quick --dir " + dir.File("disk");
  TempDir out_dir;
  const std::string json_path = out_dir.File("p.json");
  int code = std::system((env + FerryBinary() + " " + cmd + " --json -q >" + json_path).c_str());
  ASSERT_EQ(code, 0);
  auto j = nlohmann::json::parse(*ReadFileToString(json_path));
  EXPECT_EQ(j["format"], "ferry-probe");
  EXPECT_EQ(j["backend"], "cpu");
  for (const char* key : {"host_to_device", "device_to_host", "within_device", "host_memcpy"}) {
    ASSERT_FALSE(j["copies"][key].empty()) << key;
    for (const auto& e : j["copies"][key]) EXPECT_GT(e["GBps"].get<double>(), 0.0) << key;
  }
  ASSERT_EQ(j["copies"]["both_directions"].size(), 1u);
  EXPECT_GT(j["copies"]["both_directions"][0]["host_to_device_GBps"].get<double>(), 0.0);
  EXPECT_GT(j["copies"]["both_directions"][0]["device_to_host_GBps"].get<double>(), 0.0);
  ASSERT_EQ(j["disk"]["reads"].size(), 2u);
  for (const auto& e : j["disk"]["reads"]) EXPECT_GT(e["GBps"].get<double>(), 0.0);
  EXPECT_EQ(j["linear"].size(), 8u);  // 2 row counts x F32, F16, q8, q4
  for (const auto& e : j["linear"]) EXPECT_GT(e["GFLOPs"].get<double>(), 0.0) << e.dump();
  EXPECT_EQ(j["attention"].size(), 4u);  // F32, F16, q8, q4 caches (the CPU backend takes all)
  EXPECT_EQ(j["host_attention"], j["attention"]);  // the CPU backend's host is itself
  for (const auto& e : j["attention"]) EXPECT_GT(e["kv_GBps"].get<double>(), 0.0) << e.dump();
  ASSERT_EQ(j["prefill_attention"].size(), 2u);  // head_dim 128 and 32
  EXPECT_EQ(j["prefill_attention"][0]["head_dim"], 128);
  EXPECT_EQ(j["prefill_attention"][1]["head_dim"], 32);
  for (const auto& e : j["prefill_attention"]) EXPECT_GT(e["GFLOPs"].get<double>(), 0.0) << e.dump();
  EXPECT_GT(j["op_seconds"].get<double>(), 0.0);
  EXPECT_LT(j["op_seconds"].get<double>(), 0.01);
  EXPECT_GT(j["hash_GBps"].get<double>(), 0.0);
  EXPECT_TRUE(j["options"]["quick"].get<bool>());
  EXPECT_FALSE(PathExists(dir.File("disk/ferry-probe.bin")));
  // The second run reads the cache (same probe, same time stamp); --reprobe measures again.
  code = std::system((env + FerryBinary() + " " + cmd + " --json >" + json_path + " 2>" + out_dir.File("err")).c_str());
  ASSERT_EQ(code, 0);
  EXPECT_EQ(nlohmann::json::parse(*ReadFileToString(json_path))["probed_at"], j["probed_at"]);
  EXPECT_NE(ReadFileToString(out_dir.File("err"))->find("cached probe"), std::string::npos);
  code = std::system((env + FerryBinary() + " " + cmd + " --reprobe -q >" + json_path).c_str());
  ASSERT_EQ(code, 0);
  EXPECT_NE(ReadFileToString(json_path)->find("host->device GB/s"), std::string::npos);
  // A cache that is not a probe is measured again rather than trusted.
  // (Fields of the wrong type too: they once threw out of the cache check.)
  for (const auto& entry : std::vector<std::string>{"not json", "{\"format\": \"ferry-probe\"}",
                                                    "{\"format\": \"ferry-probe\", \"version\": \"5\", \"host\": 7, \"options\": []}"}) {
    std::string file;
    // The cache file's name is HOST-BACKEND.json: find it.
    code = std::system(("ls " + dir.File("cache") + " > " + out_dir.File("ls")).c_str());
    ASSERT_EQ(code, 0);
    file = dir.File("cache") + "/" + ReadFileToString(out_dir.File("ls"))->substr(0, ReadFileToString(out_dir.File("ls"))->find('\n'));
    WriteFile(file, entry);
    code = std::system((env + FerryBinary() + " " + cmd + " --json -q >" + json_path).c_str());
    ASSERT_EQ(code, 0);
    EXPECT_EQ(nlohmann::json::parse(*ReadFileToString(json_path))["format"], "ferry-probe");
  }
}

}  // namespace
}  // namespace ferry::testing

namespace ferry::testing {
namespace {

// ferry plan, bench --policy auto, --predict, --sweep, and scripts/plot-bench, on tiny-opt with a
// cached probe (a quick probe marked full: real rates of this machine, measured in seconds).
TEST(CliPlanTest, PlansRunsAutoSweepsAndPlots) {
  TempDir dir;
  const std::string env = "FERRY_PROBE_DIR=" + dir.File("cache") + " ";
  const std::string store = dir.File("store");
  ASSERT_EQ(Ferry("convert " + kModel + " --out " + store + " -q").code, 0);
  ASSERT_EQ(std::system((env + FerryBinary() + " probe --quick -q --dir " + dir.path() + " > /dev/null").c_str()), 0);
  ASSERT_EQ(std::system(("ls " + dir.File("cache") + " > " + dir.File("ls")).c_str()), 0);
  const std::string listed = *ReadFileToString(dir.File("ls"));
  const std::string cache = dir.File("cache") + "/" + listed.substr(0, listed.find('\n'));
  auto probe = nlohmann::json::parse(*ReadFileToString(cache));
  auto run = [&](const std::string& args) {
    TempDir t;
    const int status = std::system((env + FerryBinary() + " " + args + " >" + t.File("o") + " 2>" + t.File("e")).c_str());
    return Result{WIFEXITED(status) ? WEXITSTATUS(status) : -1, *ReadFileToString(t.File("o")), *ReadFileToString(t.File("e"))};
  };
  // A quick probe is not reused for planning (it would be measured again, fully): mark it full.
  ASSERT_TRUE(probe["options"]["quick"].get<bool>());
  probe["options"]["quick"] = false;
  WriteFile(cache, probe.dump());
  Result r;
  // The budget: the model's weights do not all fit.
  r = run("plan --model " + store + " --gpu-mem 12MiB --prompt-len 16 --gen-len 4 --allow kv-f16,h2o=0.25 --json -q");
  ASSERT_EQ(r.code, 0) << r.err;
  auto plans = nlohmann::json::parse(r.out);
  ASSERT_FALSE(plans["plans"].empty());
  double last = 1e300;
  for (const auto& p : plans["plans"]) {
    EXPECT_TRUE(p["runnable"].get<bool>());
    EXPECT_LE(p["predicted"]["memory"]["device"].get<uint64_t>(), uint64_t{12} << 20);
    EXPECT_GT(p["predicted"]["decode_step_s"].get<double>(), 0.0);
    EXPECT_LE(p["predicted"]["throughput_tok_s"].get<double>(), last);
    last = p["predicted"]["throughput_tok_s"].get<double>();
  }
  r = run("plan --model " + store + " --gpu-mem 12MiB --prompt-len 16 --gen-len 4 --top 3 -q");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("run it: ferry bench"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("convert"), std::string::npos) << r.out;
  // The checkpoint itself, not converted: the same plans, to run after ferry convert.
  Result ckpt = run("plan " + kModel + " --probe-dir " + dir.path() + " --gpu-mem 12MiB --prompt-len 16 --gen-len 4 --top 3 -q");
  ASSERT_EQ(ckpt.code, 0) << ckpt.err;
  EXPECT_NE(ckpt.out.find("convert first: ferry convert"), std::string::npos) << ckpt.out;
  EXPECT_NE(ckpt.out.find("(convert the store first)"), std::string::npos) << ckpt.out;
  auto first_plan = [](const std::string& out) {  // the best plan's flags
    const size_t at = out.find("--weights");
    if (at == std::string::npos) return std::string();
    std::string line = out.substr(at, out.find('\n', at) - at);
    const size_t note = line.find("  (convert");
    return note == std::string::npos ? line : line.substr(0, note);
  };
  EXPECT_FALSE(first_plan(r.out).empty());
  EXPECT_EQ(first_plan(ckpt.out), first_plan(r.out));
  // bench --policy auto runs the planner's choice within the budget and records its prediction.
  r = run("bench --model " + store + " --policy auto --gpu-mem 12MiB --prompt-len 16 --gen-len 4 --max-batch 8 --json " +
          dir.File("auto.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("policy auto: --weights"), std::string::npos) << r.err;
  auto a = nlohmann::json::parse(*ReadFileToString(dir.File("auto.json")));
  EXPECT_EQ(a["policy"], "auto");
  EXPECT_LE(a["memory"]["plan_device"].get<uint64_t>(), uint64_t{12} << 20);
  EXPECT_LE(a["batch"].get<int>(), 8);
  EXPECT_GT(a["predicted"]["decode_step_s"].get<double>(), 0.0);
  EXPECT_GT(a["measured_over_predicted"]["decode_step"].get<double>(), 0.0);
  // A sweep: one JSON line per setting (2 x 2), each predicted; then the plots.
  const std::string jsonl = dir.File("runs.jsonl");
  r = run("bench --model " + store + " --prompt-len 16 --gen-len 4 --predict -q --jsonl " + jsonl +
          " --sweep gpu-batch-size=1:2 --sweep weights=100,0,0:0,100,0");
  ASSERT_EQ(r.code, 0) << r.err;
  std::ifstream in(jsonl);
  std::vector<nlohmann::json> runs;
  for (std::string line; std::getline(in, line);) runs.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0]["gpu_batch_size"], 1);
  EXPECT_EQ(runs[3]["gpu_batch_size"], 2);
  EXPECT_EQ(runs[1]["weights_percent"][1], 100.0);
  for (const auto& j : runs) EXPECT_TRUE(j.contains("predicted"));
  // Debian's python3 (python3-matplotlib, scripts/install-deps), not whatever python3 is first in PATH.
  const std::string plot = "/usr/bin/python3 " + std::string(FERRY_SOURCE_DIR) + "/scripts/plot-bench " + jsonl + " " + dir.File("plots") + " > /dev/null";
  ASSERT_EQ(std::system(plot.c_str()), 0);
  for (const char* f : {"throughput.png", "throughput.svg", "busy.png", "busy.svg"}) {
    auto bytes = ReadFileToString(dir.File(std::string("plots/") + f));
    ASSERT_TRUE(bytes.ok()) << f;
    EXPECT_GT(bytes->size(), 1000u) << f;
  }
  EXPECT_EQ(ReadFileToString(dir.File("plots/throughput.png"))->substr(1, 3), "PNG");
  // Deja Vu where allowed: at batch 1 sparse plans are among the candidates; bench --policy auto
  // on a store needs the trained predictors for them, and says so.
  r = run("plan --model " + store + " --gpu-mem 12MiB --prompt-len 16 --gen-len 4 --max-batch 1 --allow sparse=0.15 --top 20 --json -q");
  ASSERT_EQ(r.code, 0) << r.err;
  int sparse_plans = 0;
  const nlohmann::json sparse_json = nlohmann::json::parse(r.out);
  for (const auto& p : sparse_json["plans"]) {
    if (p["flags"].get<std::string>().find("--sparsity-k 0.15") != std::string::npos) {
      ++sparse_plans;
      EXPECT_LE(p["predicted"]["memory"]["device"].get<uint64_t>(), uint64_t{12} << 20);
      EXPECT_NEAR(p["predicted"]["ffn_union"].get<double>(), 0.15, 1e-9);
    }
  }
  EXPECT_GT(sparse_plans, 0) << r.out;
  r = run("bench --model " + store + " --policy auto --allow sparse=0.15 --prompt-len 16 --gen-len 4 -q");
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(Lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find("--sparsity DIR"), std::string::npos) << r.err;
  // No probe cached and a budget smaller than the probe needs: refused before it allocates.
  {
    TempDir empty;
    const int status = std::system(("FERRY_PROBE_DIR=" + empty.path() + " " + FerryBinary() + " bench --model " + store +
                                    " --predict --gpu-mem 8MiB --prompt-len 16 --gen-len 4 -q >/dev/null 2>" + empty.File("e"))
                                       .c_str());
    EXPECT_EQ(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 1);
    const std::string err = *ReadFileToString(empty.File("e"));
    EXPECT_NE(err.find("once without them"), std::string::npos) << err;
    EXPECT_EQ(Lines(err), 1) << err;
  }
  // Bad input: one line and a non-zero exit.
  for (const std::string& bad : {"plan --model " + store + " --allow q3 -q", "plan --model " + store + " --gpu-mem 1MiB -q",
                                 "bench --model " + store + " --sweep depth=1 --jsonl " + dir.File("x.jsonl") + " -q",
                                 "bench --model " + store + " --sweep gpu-batch-size=0 --jsonl " + dir.File("x.jsonl") + " -q",
                                 "bench --model " + store + " --sweep gpu-batch-size=1 -q",
                                 "plan --model " + dir.File("nothing") + " -q"}) {
    r = run(bad);
    EXPECT_EQ(r.code, 1) << bad;
    EXPECT_EQ(Lines(r.err), 1) << bad << ": " << r.err;
  }
}

}  // namespace
}  // namespace ferry::testing

namespace ferry::testing {
namespace {

// generate on a store whose weights do not fit --gpu-mem: --policy auto is the default, places
// them within the budgets, says so, and generates what the resident model generates.
TEST(CliPlanTest, GenerateOffloadsAStoreThatDoesNotFitResident) {
  TempDir dir;
  const std::string store = dir.File("store");
  ASSERT_EQ(Ferry("convert " + kModel + " --out " + store + " -q").code, 0);
  const std::string gen = "generate --model " + store + " --prompt 'In the beginning' --max-new-tokens 6 -q";
  Result resident = Ferry(gen);
  ASSERT_EQ(resident.code, 0) << resident.err;
  Result fits = Ferry(gen + " --gpu-mem 64MiB");
  ASSERT_EQ(fits.code, 0) << fits.err;
  EXPECT_EQ(fits.err.find("policy auto"), std::string::npos) << fits.err;
  // tiny-opt's weights are about 14 MiB; streaming them needs about 31 MiB (its whole-context
  // prefill workspace): between the two, a resident run does not fit and auto does.
  Result tight = Ferry(gen + " --gpu-mem 12MiB --policy manual");
  EXPECT_EQ(tight.code, 1);
  EXPECT_EQ(Lines(tight.err), 1) << tight.err;
  Result offloaded = Ferry(gen + " --gpu-mem 34MiB --policy auto");
  ASSERT_EQ(offloaded.code, 0) << offloaded.err;
  EXPECT_NE(offloaded.err.find("ferry: policy auto: --weights "), std::string::npos) << offloaded.err;
  EXPECT_EQ(offloaded.out, resident.out);
  Result disk = Ferry(gen + " --gpu-mem 34MiB --cpu-mem 3MiB --policy auto");
  ASSERT_EQ(disk.code, 0) << disk.err;
  EXPECT_EQ(disk.out, resident.out);
  EXPECT_EQ(disk.err.find(",0 ("), std::string::npos) << disk.err;  // some of it on disk
  // Weights larger than the budget: auto by default (here nothing fits either: one clear error
  // from the planner, not an allocation failure).
  Result small = Ferry(gen + " --gpu-mem 12MiB");
  EXPECT_EQ(small.code, 1);
  EXPECT_NE(small.err.find("--policy auto: needs"), std::string::npos) << small.err;
  // Auto with --weights, or on a checkpoint that is not a store, is one clear error.
  for (const std::string& bad : {gen + " --policy auto --weights 0,100,0", gen + " --policy auto --quantize q4",
                                 "generate " + kModel + " --prompt x --policy auto -q", gen + " --gpu-mem 4MiB"}) {
    Result r = Ferry(bad);
    EXPECT_EQ(r.code, 1) << bad;
    EXPECT_EQ(Lines(r.err), 1) << bad << ": " << r.err;
  }
}

}  // namespace
}  // namespace ferry::testing
