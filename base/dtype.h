// The one element-type enum of ferry, its sizes and names, and scalar fp16/bf16 <-> fp32
// conversion (round to nearest even, NaN and Inf preserved).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace ferry {

enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kI64, kU8 };

size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);
// Parses safetensors names ("F16", "BF16", "F32", "I32", "I64", "U8").
absl::StatusOr<DType> ParseSafetensorsDType(std::string_view name);

inline float Bf16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Converts `n` elements of `src` (dtype) to float.
void ConvertToF32(DType dtype, const void* src, float* dst, size_t n);
// Converts `n` floats to `dtype` (kF32, kF16 or kBF16).
void ConvertFromF32(DType dtype, const float* src, void* dst, size_t n);

}  // namespace ferry
