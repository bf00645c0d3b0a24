// Group-wise quantized weight matrices (issue 15's formats), the layout every tier holds and moves:
//
//   q4: asymmetric 4-bit, per group of G values along a row (the input dimension): an fp16 scale
//       s and an fp16 minimum m; value = q * s + m with q in [0, 15] (FlexGen's min/max scheme).
//   q8: symmetric 8-bit, per group: an fp16 scale s; value = q * s with q in [-128, 127].
//
// A [rows, cols] matrix is one contiguous region: the packed values row by row (q4: two per byte,
// the even column in the low nibble), then the scales (rows x cols/G fp16), then for q4 the
// minimums, each part starting 64-byte aligned; the region's size is rounded up to 4 KiB so a layer
// of such tensors is still one aligned read. Quantization rounds to nearest (ties to even) with
// the fp16-rounded scale and minimum it stores, so dequantization is exact arithmetic on what the
// file holds. GGUF's Q4_0, Q4_1 (block 32) and Q8_0 blocks map onto q4 and q8 with G = 32 value for
// value: dequantizing the mapped matrix gives the GGUF dequantizer's floats exactly (equal values;
// a zero may come out +0 where GGUF's (q - 8) d gives -0).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "base/dtype.h"

namespace ferry {

enum class QuantKind : uint8_t { kQ4, kQ8 };

struct QuantFormat {
  QuantKind kind = QuantKind::kQ4;
  int group = 64;
  bool operator==(const QuantFormat& o) const { return kind == o.kind && group == o.group; }
};

// What a KV cache stores per element: F32 or F16, or group-wise q8/q4 (groups along head_dim,
// dequantized inside the attention kernels; scores and sums stay fp32).
struct KvType {
  DType dtype = DType::kF32;
  std::optional<QuantFormat> quant;  // set: dtype is U8 and the cache tensors are quantized regions
  KvType() = default;
  KvType(DType d) : dtype(d) {}  // NOLINT: a plain dtype is a KV type
  explicit KvType(QuantFormat q) : dtype(DType::kU8), quant(q) {}
  bool operator==(const KvType& o) const { return dtype == o.dtype && quant == o.quant; }
  // Bytes of a [rows, cols] tensor of this type (quantized: the 4 KiB-rounded region; 0 when the
  // group does not divide cols).
  uint64_t Bytes(int64_t rows, int64_t cols) const;
  // F32, F16 or the element type a quantized cache's dense scratch uses (F16).
  DType dense_dtype() const { return quant ? DType::kF16 : dtype; }
};
// "F32", "F16" (DTypeName), "q8g64", ...
std::string KvTypeName(const KvType& t);
// "f32" | "f16" | "q8" | "q4" for caches of heads of head_dim (the group: the largest of 64, 32,
// ..., 2 that divides head_dim); kInvalidArgument otherwise.
absl::StatusOr<KvType> ParseKvType(const std::string& name, int head_dim);

// "q4" / "q8" with a group (even, 2..4096): kInvalidArgument otherwise.
absl::StatusOr<QuantFormat> MakeQuantFormat(const std::string& kind, int group);
std::string QuantFormatName(const QuantFormat& f);  // "q4g64"
// The inverse of QuantFormatName ("q4g64", "q8g32"); kInvalidArgument for anything else.
absl::StatusOr<QuantFormat> ParseQuantFormatName(const std::string& name);

struct QuantLayout {
  size_t values_offset = 0, values_bytes = 0;
  size_t scales_offset = 0, mins_offset = 0;  // mins: q4 only (0 for q8)
  size_t groups_per_row = 0;
  size_t bytes = 0;  // the whole region, a multiple of 4096
};

// A Deja Vu neuron bundle of a q4/q8 model (FfnBundles): FC1 row j and FC2 column j (d values
// each) as one quantized row of 2d values in groups of G (G divides d, so no group straddles the
// two halves), then its fp16 scales, for q4 its fp16 minimums, then FC1's bias j in fp32; the whole
// padded to 16 bytes, so a neuron is still one read. `row` addresses one bundle as a one-row
// quantized matrix (QuantizeSpan / DequantizeSpan with row 0 and cols 2d).
struct BundleQuantLayout {
  QuantLayout row;
  size_t bias_offset = 0;
  size_t bytes = 0;
};
// kInvalidArgument when the group does not divide d.
absl::StatusOr<BundleQuantLayout> LayoutQuantBundle(const QuantFormat& f, int64_t d);

// kInvalidArgument when cols is not a multiple of the group or the sizes overflow.
absl::StatusOr<QuantLayout> LayoutQuantized(const QuantFormat& f, int64_t rows, int64_t cols);

// Quantizes fp32 rows into `out` (layout.bytes, zero padding included).
void QuantizeRows(const QuantFormat& f, const QuantLayout& layout, const float* w, int64_t rows, int64_t cols, uint8_t* out);
// Dequantizes rows [row0, row0 + n) into `out` (n x cols fp32).
void DequantizeRows(const QuantFormat& f, const QuantLayout& layout, const uint8_t* q, int64_t cols, int64_t row0, int64_t n,
                    float* out);

// Spans of one row, for caches written a token at a time: columns [col0, col0 + n) of row `row`
// (col0 and n multiples of the group), quantized from / dequantized to n floats with exactly the
// arithmetic of QuantizeRows / DequantizeRows. QuantizeSpan writes only that span's bytes.
void QuantizeSpan(const QuantFormat& f, const QuantLayout& layout, const float* x, int64_t cols, int64_t row, int64_t col0,
                  int64_t n, uint8_t* out);
void DequantizeSpan(const QuantFormat& f, const QuantLayout& layout, const uint8_t* q, int64_t cols, int64_t row, int64_t col0,
                    int64_t n, float* out);

// Copies row src_row of the quantized matrix `src` to row dst_row of `dst` (same format and shape):
// its values, scale and minimum. Permuting rows (a Q/K head reordering) needs no rounding.
void CopyQuantizedRow(const QuantFormat& f, const QuantLayout& layout, int64_t cols, const uint8_t* src, int64_t src_row,
                      uint8_t* dst, int64_t dst_row);

// The format a GGUF block type maps onto without rounding (type 2 = Q4_0 and 3 = Q4_1: q4 group
// 32; 8 = Q8_0: q8 group 32); kInvalidArgument for the others (they are requantized).
absl::StatusOr<QuantFormat> GgufQuantFormat(uint32_t ggml_type);
// The GGUF blocks of a [rows, cols] tensor into that format's layout. kOutOfRange when a Q4_0
// block's minimum (-8 d) does not fit fp16 (the caller requantizes then).
absl::Status GgufBlocksToQuantized(uint32_t ggml_type, const uint8_t* blocks, int64_t rows, int64_t cols,
                                   const QuantLayout& layout, uint8_t* out);

}  // namespace ferry
