#include "offload/policy.h"

#include "gtest/gtest.h"

namespace ferry::offload {
namespace {

TEST(PolicyTest, ParsesSplitsAndSizes) {
  auto s = ParseWeightSplit("20,50,30");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->gpu, 20);
  EXPECT_EQ(s->disk, 30);
  EXPECT_EQ(ParseWeightSplit("20,50").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseWeightSplit("20,50,40").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseWeightSplit("a,50,50").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseBytes("24GiB"), 24ull << 30);
  EXPECT_EQ(*ParseBytes("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseBytes("1.5G"), 3ull << 29);
  EXPECT_EQ(*ParseBytes("1000"), 1000u);
  EXPECT_FALSE(ParseBytes("lots").ok());
}

TEST(PolicyTest, SplitIsExactTo4KiBAndMemoryIsCounted) {
  PlanInputs in;
  in.layer_bytes = {4096 * 1000, 4096 * 1000, 4096 * 10};
  in.split = {25, 35, 40};
  in.other_device_bytes = 12345;
  auto p = MakePlan(in);
  ASSERT_TRUE(p.ok());
  const LayerPlacement& l = p->layers[0];
  EXPECT_EQ(l.gpu_end, 4096u * 250);
  EXPECT_EQ(l.cpu_end, 4096u * 600);
  EXPECT_EQ(l.disk_bytes(), 4096u * 400);
  EXPECT_EQ(p->layers[2].gpu_end % 4096, 0u);
  EXPECT_EQ(p->working_bytes, 2u * 4096 * 1000);
  EXPECT_EQ(p->staging_bytes, 2u * 4096 * 400);
  EXPECT_EQ(p->device_bytes, 12345 + p->resident_bytes + p->working_bytes);
  EXPECT_EQ(p->host_bytes, p->pinned_bytes + p->staging_bytes);
  // All resident: no slots.
  in.split = {100, 0, 0};
  p = MakePlan(in);
  EXPECT_EQ(p->working_bytes, 0u);
  EXPECT_EQ(p->resident_bytes, 4096u * 2010);
  // All on CPU: the whole layer streams, nothing stages.
  in.split = {0, 100, 0};
  p = MakePlan(in);
  EXPECT_EQ(p->pinned_bytes, 4096u * 2010);
  EXPECT_EQ(p->staging_bytes, 0u);
}

TEST(PolicyTest, RefusesWhatDoesNotFitSayingByHowMuch) {
  PlanInputs in;
  in.layer_bytes = std::vector<uint64_t>(10, 100 << 20);  // 10 x 100 MiB
  in.split = {100, 0, 0};
  in.device_budget = 600 << 20;
  auto p = MakePlan(in);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(p.status().message().find("over by 400 MiB"), std::string::npos) << p.status();
  in.split = {0, 100, 0};
  in.host_budget = 500 << 20;
  p = MakePlan(in);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(p.status().message().find("CPU memory budget"), std::string::npos) << p.status();
  in.split = {0, 0, 100};
  p = MakePlan(in);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->host_bytes, 200u << 20);  // two staging slots
}

}  // namespace
}  // namespace ferry::offload
