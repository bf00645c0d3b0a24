#include "base/dtype.h"

#include <cmath>
#include <cstring>
#include <random>

#include <immintrin.h>

#include "gtest/gtest.h"

namespace ferry {
namespace {

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(*ParseSafetensorsDType("BF16"), DType::kBF16);
  EXPECT_EQ(ParseSafetensorsDType("F8_E4M3").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DTypeTest, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    // The reference: the CPU's own conversion (F16C, part of x86-64-v3), whatever the compiler.
    const float ref = _cvtsh_ss(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(ref));
      EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16(f))));
      continue;
    }
    ASSERT_EQ(f, ref) << h;
    ASSERT_EQ(F32ToF16(f), h) << h;
  }
}

TEST(DTypeTest, FloatToHalfRoundsLikeTheHardware) {
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) continue;
    const uint16_t ref_bits = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    ASSERT_EQ(F32ToF16(f), ref_bits) << f;
  }
}

TEST(DTypeTest, BulkConversionMatchesScalar) {
  std::vector<uint16_t> h(1003);
  std::mt19937 rng(3);
  for (auto& x : h) x = static_cast<uint16_t>(rng() & 0x7bff);  // finite values
  std::vector<float> f(h.size());
  ConvertToF32(DType::kF16, h.data(), f.data(), h.size());
  for (size_t i = 0; i < h.size(); ++i) ASSERT_EQ(f[i], F16ToF32(h[i]));
}

TEST(DTypeTest, Bfloat16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToF32(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down).
  EXPECT_EQ(F32ToBf16(1.00390625f), 0x3f80);
  // Just above halfway rounds up.
  EXPECT_EQ(F32ToBf16(1.0040f), 0x3f81);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
}

}  // namespace
}  // namespace ferry
