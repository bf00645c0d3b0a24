// Group-wise q4/q8 weights (base/quant.h): quantize -> dequantize equals an independent scalar
// reference of the same rounding on random matrices (every value equal: the sign of a zero aside), the error stays within half a
// step, the layout is aligned, and GGUF's Q4_0, Q4_1 and Q8_0 blocks map onto it value for value
// (the mapped matrix dequantizes to exactly the GGUF dequantizer's values).
#include "base/quant.h"

#include <cmath>
#include <cstring>
#include <random>

#include "base/dtype.h"
#include "gtest/gtest.h"
#include "io/gguf.h"
#include "test_util.h"

namespace ferry {
namespace {

// Every value equal (== : +0 and -0 are the same value, NaN never appears here).
int64_t Differing(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] == b[i] ? 0 : 1;
  return n;
}

// The reference: one group at a time, written from the format's definition.
std::vector<float> Reference(const QuantFormat& f, const std::vector<float>& w, int64_t rows, int64_t cols) {
  std::vector<float> out(w.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g0 = 0; g0 < cols; g0 += f.group) {
      const float* x = &w[static_cast<size_t>(r * cols + g0)];
      float* y = &out[static_cast<size_t>(r * cols + g0)];
      if (f.kind == QuantKind::kQ4) {
        float lo = x[0], hi = x[0];
        for (int i = 0; i < f.group; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
        const float s = F16ToF32(F32ToF16((hi - lo) / 15.0f)), m = F16ToF32(F32ToF16(lo));
        for (int i = 0; i < f.group; ++i) {
          float q = s > 0 ? std::nearbyint((x[i] - m) / s) : 0.0f;
          q = std::min(15.0f, std::max(0.0f, q));
          y[i] = q * s + m;
        }
      } else {
        float amax = 0;
        for (int i = 0; i < f.group; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float s = F16ToF32(F32ToF16(amax / 127.0f));
        for (int i = 0; i < f.group; ++i) {
          float q = s > 0 ? std::nearbyint(x[i] / s) : 0.0f;
          q = std::min(127.0f, std::max(-128.0f, q));
          y[i] = q * s;
        }
      }
    }
  }
  return out;
}

class QuantTest : public ::testing::TestWithParam<std::tuple<const char*, int>> {};

TEST_P(QuantTest, RoundTripEqualsTheReferenceBitwise) {
  const auto [kind, group] = GetParam();
  auto f = MakeQuantFormat(kind, group);
  ASSERT_TRUE(f.ok());
  const int64_t rows = 37, cols = group * 5;
  std::vector<float> w = ferry::testing::RandomValues(static_cast<size_t>(rows * cols), 1234 + group);
  for (int64_t c = 0; c < group; ++c) w[static_cast<size_t>(c)] = 0.25f;  // a constant group: scale 0
  w[static_cast<size_t>(cols + 3)] = 40.0f;                            // an outlier
  auto layout = LayoutQuantized(*f, rows, cols);
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(layout->bytes % 4096, 0u);
  EXPECT_EQ(layout->scales_offset % 64, 0u);
  if (f->kind == QuantKind::kQ4) {
    EXPECT_EQ(layout->mins_offset % 64, 0u);
  }
  std::vector<uint8_t> q(layout->bytes, 0xAB);
  QuantizeRows(*f, *layout, w.data(), rows, cols, q.data());
  std::vector<float> back(w.size());
  DequantizeRows(*f, *layout, q.data(), cols, 0, rows, back.data());
  const std::vector<float> ref = Reference(*f, w, rows, cols);
  EXPECT_EQ(Differing(back, ref), 0);
  // Rows from the middle come out the same.
  std::vector<float> part(static_cast<size_t>(3 * cols));
  DequantizeRows(*f, *layout, q.data(), cols, 10, 3, part.data());
  EXPECT_EQ(std::memcmp(part.data(), back.data() + 10 * cols, part.size() * sizeof(float)), 0);
  // Within half a step of the group (plus the fp16 rounding of the minimum).
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g0 = 0; g0 < cols; g0 += group) {
      float lo = 1e30f, hi = -1e30f;
      for (int i = 0; i < group; ++i) lo = std::min(lo, w[static_cast<size_t>(r * cols + g0 + i)]), hi = std::max(hi, w[static_cast<size_t>(r * cols + g0 + i)]);
      const float step = f->kind == QuantKind::kQ4 ? (hi - lo) / 15.0f : std::max(std::fabs(lo), std::fabs(hi)) / 127.0f;
      for (int i = 0; i < group; ++i) {
        const size_t at = static_cast<size_t>(r * cols + g0 + i);
        EXPECT_LE(std::fabs(back[at] - w[at]), 0.5f * step * 1.01f + 1e-3f * std::fabs(lo) + 1e-6f) << r << "," << g0 + i;
      }
    }
  }
  if (f->kind == QuantKind::kQ4) {
    EXPECT_EQ(back[0], 0.25f);  // a constant group is its minimum, exactly
  }
  // Spans (a KV cache's token-at-a-time writes): rows written span by span, in any order, into a
  // region of garbage give the same bytes as QuantizeRows, and read back span by span the same
  // floats; a span write touches nothing outside its span.
  std::vector<uint8_t> spans(layout->bytes, 0);
  for (int64_t r = rows - 1; r >= 0; --r) {
    for (int64_t c0 = cols - 2 * group; c0 >= 0; c0 -= 2 * group) {
      const int64_t n = std::min<int64_t>(2 * group, cols - c0);
      QuantizeSpan(*f, *layout, w.data() + r * cols + c0, cols, r, c0, n, spans.data());
    }
    if (cols % (2 * group) != 0) QuantizeSpan(*f, *layout, w.data() + r * cols, cols, r, 0, group, spans.data());
  }
  EXPECT_EQ(spans, q);
  std::vector<float> span_back(static_cast<size_t>(group));
  DequantizeSpan(*f, *layout, q.data(), cols, 7, 2 * group, group, span_back.data());
  EXPECT_EQ(std::memcmp(span_back.data(), back.data() + 7 * cols + 2 * group, group * sizeof(float)), 0);
  std::vector<uint8_t> one = q;
  std::vector<float> junk(static_cast<size_t>(group), 3.0f);
  QuantizeSpan(*f, *layout, junk.data(), cols, 5, group, group, one.data());
  std::vector<float> after(w.size());
  DequantizeRows(*f, *layout, one.data(), cols, 0, rows, after.data());
  for (size_t i = 0; i < w.size(); ++i) {
    const bool inside = static_cast<int64_t>(i) / cols == 5 && static_cast<int64_t>(i) % cols >= group &&
                        static_cast<int64_t>(i) % cols < 2 * group;
    if (inside) {
      EXPECT_NEAR(after[i], 3.0f, 2e-3f) << i;
    } else {
      ASSERT_EQ(after[i], back[i]) << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantTest,
                         ::testing::Values(std::make_tuple("q4", 64), std::make_tuple("q4", 32), std::make_tuple("q4", 128),
                                           std::make_tuple("q8", 64), std::make_tuple("q8", 32)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param)) + "g" + std::to_string(std::get<1>(info.param));
                         });

TEST(QuantTest, BadFormatsAndShapesAreRefused) {
  EXPECT_FALSE(MakeQuantFormat("q3", 64).ok());
  EXPECT_FALSE(MakeQuantFormat("q4", 63).ok());
  EXPECT_FALSE(MakeQuantFormat("q4", 0).ok());
  EXPECT_FALSE(LayoutQuantized({QuantKind::kQ4, 64}, 4, 100).ok());  // 100 columns are not whole groups
  EXPECT_FALSE(LayoutQuantized({QuantKind::kQ4, 64}, 0, 64).ok());
  EXPECT_EQ(QuantFormatName({QuantKind::kQ8, 32}), "q8g32");
}

// Random GGUF blocks of each type -> q4/q8 group 32 -> dequantized: the GGUF dequantizer's floats.
TEST(QuantTest, GgufBlocksMapWithoutRounding) {
  std::mt19937 rng(7);
  for (uint32_t type : {2u, 3u, 8u}) {
    const int64_t rows = 6, cols = 96;
    const size_t block = type == 2 ? 18 : type == 3 ? 20 : 34;
    std::vector<uint8_t> blocks(static_cast<size_t>(rows * cols / 32) * block);
    for (auto& b : blocks) b = static_cast<uint8_t>(rng());
    for (size_t b = 0; b < blocks.size() / block; ++b) {  // finite fp16 scales and minimums
      for (int h = 0; h < (type == 3 ? 2 : 1); ++h) {
        const uint16_t v = F32ToF16(std::uniform_real_distribution<float>(-0.05f, 0.05f)(rng));
        std::memcpy(&blocks[b * block + 2 * h], &v, 2);
      }
    }
    auto f = GgufQuantFormat(type);
    ASSERT_TRUE(f.ok());
    auto layout = LayoutQuantized(*f, rows, cols);
    ASSERT_TRUE(layout.ok());
    std::vector<uint8_t> q(layout->bytes);
    ASSERT_TRUE(GgufBlocksToQuantized(type, blocks.data(), rows, cols, *layout, q.data()).ok());
    std::vector<float> mine(static_cast<size_t>(rows * cols)), theirs(mine.size());
    DequantizeRows(*f, *layout, q.data(), cols, 0, rows, mine.data());
    io::DequantizeGgml(type, blocks.data(), theirs.data(), rows * cols);
    EXPECT_EQ(Differing(mine, theirs), 0) << "type " << type;
  }
  EXPECT_FALSE(GgufQuantFormat(12).ok());  // Q4_K: requantized
}

}  // namespace
}  // namespace ferry
