#include "base/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/dtype.h"
#include "base/status.h"

namespace ferry {
namespace {

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

uint16_t LoadHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}
void StoreHalf(uint8_t* p, uint16_t h) { std::memcpy(p, &h, 2); }

}  // namespace

absl::StatusOr<QuantFormat> MakeQuantFormat(const std::string& kind, int group) {
  QuantFormat f;
  if (kind == "q4") {
    f.kind = QuantKind::kQ4;
  } else if (kind == "q8") {
    f.kind = QuantKind::kQ8;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("quantization must be q4 or q8, not \"", kind, "\""));
  }
  if (group < 2 || group > 4096 || group % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("quantization group must be even and in [2, 4096], got ", group));
  }
  f.group = group;
  return f;
}

std::string QuantFormatName(const QuantFormat& f) { return absl::StrCat(f.kind == QuantKind::kQ4 ? "q4" : "q8", "g", f.group); }

uint64_t KvType::Bytes(int64_t rows, int64_t cols) const {
  if (!quant) return static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols) * DTypeSize(dtype);
  auto layout = LayoutQuantized(*quant, rows, cols);
  return layout.ok() ? layout->bytes : 0;
}

std::string KvTypeName(const KvType& t) {
  if (t.quant) return QuantFormatName(*t.quant);
  return DTypeName(t.dtype);
}

absl::StatusOr<KvType> ParseKvType(const std::string& name, int head_dim) {
  if (name == "f32") return KvType(DType::kF32);
  if (name == "f16") return KvType(DType::kF16);
  if (name != "q8" && name != "q4") {
    return absl::InvalidArgumentError(absl::StrCat("the KV cache type must be f32, f16, q8 or q4, not \"", name, "\""));
  }
  int group = 64;
  while (group >= 2 && head_dim % group != 0) group /= 2;
  if (group < 2) return absl::InvalidArgumentError(absl::StrCat("a q8/q4 KV cache needs an even head_dim, not ", head_dim));
  FERRY_ASSIGN_OR_RETURN(const QuantFormat f, MakeQuantFormat(name, group));
  return KvType(f);
}

absl::StatusOr<QuantFormat> ParseQuantFormatName(const std::string& name) {
  const size_t g = name.find('g');
  int group = 0;
  if (name.size() < 4 || g != 2 || name.size() > 7) {
    return absl::InvalidArgumentError(absl::StrCat("\"", name, "\" is not a quantization format (q4g64, q8g32, ...)"));
  }
  for (size_t i = 3; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || (i == 3 && name[i] == '0')) {
      return absl::InvalidArgumentError(absl::StrCat("\"", name, "\" is not a quantization format (q4g64, q8g32, ...)"));
    }
    group = group * 10 + (name[i] - '0');
  }
  return MakeQuantFormat(name.substr(0, 2), group);
}

absl::StatusOr<QuantLayout> LayoutQuantized(const QuantFormat& f, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || cols % f.group != 0) {
    return absl::InvalidArgumentError(absl::StrCat("a ", rows, " x ", cols, " matrix cannot be quantized in groups of ", f.group,
                                                   " (the columns must be a multiple of the group)"));
  }
  if (rows > (int64_t{1} << 32) || cols > (int64_t{1} << 32) || rows * cols > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(absl::StrCat("a ", rows, " x ", cols, " matrix is too large to quantize"));
  }
  QuantLayout l;
  const size_t r = static_cast<size_t>(rows), c = static_cast<size_t>(cols);
  l.groups_per_row = c / static_cast<size_t>(f.group);
  l.values_bytes = f.kind == QuantKind::kQ4 ? r * c / 2 : r * c;
  l.scales_offset = AlignUp(l.values_bytes, 64);
  const size_t scales = r * l.groups_per_row * 2;
  l.mins_offset = f.kind == QuantKind::kQ4 ? AlignUp(l.scales_offset + scales, 64) : 0;
  const size_t end = f.kind == QuantKind::kQ4 ? l.mins_offset + scales : l.scales_offset + scales;
  l.bytes = AlignUp(end, 4096);
  return l;
}

absl::StatusOr<BundleQuantLayout> LayoutQuantBundle(const QuantFormat& f, int64_t d) {
  if (d <= 0 || d % f.group != 0 || d > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat("a neuron bundle of width ", d, " cannot be quantized in groups of ", f.group,
                                                   " (the group must divide the hidden size)"));
  }
  BundleQuantLayout b;
  const size_t n = 2 * static_cast<size_t>(d);
  b.row.groups_per_row = n / static_cast<size_t>(f.group);
  b.row.values_bytes = f.kind == QuantKind::kQ4 ? n / 2 : n;
  b.row.scales_offset = b.row.values_bytes;  // even: d is a multiple of an even group
  b.row.mins_offset = f.kind == QuantKind::kQ4 ? b.row.scales_offset + b.row.groups_per_row * 2 : 0;
  const size_t end = (f.kind == QuantKind::kQ4 ? b.row.mins_offset : b.row.scales_offset) + b.row.groups_per_row * 2;
  b.bias_offset = AlignUp(end, 4);
  b.bytes = AlignUp(b.bias_offset + sizeof(float), 16);
  b.row.bytes = b.bytes;
  return b;
}

namespace {

// Group gi (values x[0..g)) into its codes and parameters; `v` points at the group's first value
// byte (q4: two per byte, the even column in the low nibble). The group's value bytes are
// overwritten.
void QuantizeGroup(const QuantFormat& f, const QuantLayout& l, const float* x, size_t gi, uint8_t* v, uint8_t* out) {
  const size_t g = static_cast<size_t>(f.group);
  if (f.kind == QuantKind::kQ4) {
    float mn = x[0], mx = x[0];
    for (size_t i = 1; i < g; ++i) mn = std::min(mn, x[i]), mx = std::max(mx, x[i]);
    const uint16_t s16 = F32ToF16((mx - mn) / 15.0f), m16 = F32ToF16(mn);
    const float s = F16ToF32(s16), m = F16ToF32(m16);
    StoreHalf(out + l.scales_offset + gi * 2, s16);
    StoreHalf(out + l.mins_offset + gi * 2, m16);
    std::memset(v, 0, g / 2);
    for (size_t i = 0; i < g; ++i) {
      const float q = s > 0.0f ? std::nearbyint((x[i] - m) / s) : 0.0f;
      const uint8_t qi = static_cast<uint8_t>(std::clamp(q, 0.0f, 15.0f));
      v[i / 2] |= static_cast<uint8_t>(i % 2 == 0 ? qi : qi << 4);
    }
  } else {
    float amax = 0.0f;
    for (size_t i = 0; i < g; ++i) amax = std::max(amax, std::fabs(x[i]));
    const uint16_t s16 = F32ToF16(amax / 127.0f);
    const float s = F16ToF32(s16);
    StoreHalf(out + l.scales_offset + gi * 2, s16);
    for (size_t i = 0; i < g; ++i) {
      const float q = s > 0.0f ? std::nearbyint(x[i] / s) : 0.0f;
      v[i] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -128.0f, 127.0f)));
    }
  }
}

void DequantizeGroup(const QuantFormat& f, const QuantLayout& l, const uint8_t* q, size_t gi, const uint8_t* v, float* y) {
  const size_t g = static_cast<size_t>(f.group);
  const float s = F16ToF32(LoadHalf(q + l.scales_offset + gi * 2));
  if (f.kind == QuantKind::kQ4) {
    const float m = F16ToF32(LoadHalf(q + l.mins_offset + gi * 2));
    for (size_t i = 0; i < g; i += 2) {
      y[i] = static_cast<float>(v[i / 2] & 0xF) * s + m;
      y[i + 1] = static_cast<float>(v[i / 2] >> 4) * s + m;
    }
  } else {
    const int8_t* c = reinterpret_cast<const int8_t*>(v);
    for (size_t i = 0; i < g; ++i) y[i] = static_cast<float>(c[i]) * s;
  }
}

size_t ValueByte(const QuantFormat& f, size_t element) { return f.kind == QuantKind::kQ4 ? element / 2 : element; }

}  // namespace

void QuantizeRows(const QuantFormat& f, const QuantLayout& l, const float* w, int64_t rows, int64_t cols, uint8_t* out) {
  std::memset(out, 0, l.bytes);
  for (int64_t r = 0; r < rows; ++r) QuantizeSpan(f, l, w + r * cols, cols, r, 0, cols, out);
}

void DequantizeRows(const QuantFormat& f, const QuantLayout& l, const uint8_t* q, int64_t cols, int64_t row0, int64_t n, float* out) {
  for (int64_t r = row0; r < row0 + n; ++r) DequantizeSpan(f, l, q, cols, r, 0, cols, out + (r - row0) * cols);
}

void QuantizeSpan(const QuantFormat& f, const QuantLayout& l, const float* x, int64_t cols, int64_t row, int64_t col0, int64_t n,
                  uint8_t* out) {
  const size_t g = static_cast<size_t>(f.group), base = static_cast<size_t>(row) * static_cast<size_t>(cols) + static_cast<size_t>(col0);
  for (size_t k = 0; k < static_cast<size_t>(n) / g; ++k) {
    const size_t gi = static_cast<size_t>(row) * l.groups_per_row + static_cast<size_t>(col0) / g + k;
    QuantizeGroup(f, l, x + k * g, gi, out + ValueByte(f, base + k * g), out);
  }
}

void DequantizeSpan(const QuantFormat& f, const QuantLayout& l, const uint8_t* q, int64_t cols, int64_t row, int64_t col0, int64_t n,
                    float* out) {
  const size_t g = static_cast<size_t>(f.group), base = static_cast<size_t>(row) * static_cast<size_t>(cols) + static_cast<size_t>(col0);
  for (size_t k = 0; k < static_cast<size_t>(n) / g; ++k) {
    const size_t gi = static_cast<size_t>(row) * l.groups_per_row + static_cast<size_t>(col0) / g + k;
    DequantizeGroup(f, l, q, gi, q + ValueByte(f, base + k * g), out + k * g);
  }
}

void CopyQuantizedRow(const QuantFormat& f, const QuantLayout& l, int64_t cols, const uint8_t* src, int64_t src_row, uint8_t* dst,
                      int64_t dst_row) {
  const size_t row_values = f.kind == QuantKind::kQ4 ? static_cast<size_t>(cols) / 2 : static_cast<size_t>(cols);
  std::memcpy(dst + dst_row * row_values, src + src_row * row_values, row_values);
  const size_t row_params = l.groups_per_row * 2;
  std::memcpy(dst + l.scales_offset + dst_row * row_params, src + l.scales_offset + src_row * row_params, row_params);
  if (f.kind == QuantKind::kQ4) {
    std::memcpy(dst + l.mins_offset + dst_row * row_params, src + l.mins_offset + src_row * row_params, row_params);
  }
}

absl::StatusOr<QuantFormat> GgufQuantFormat(uint32_t type) {
  if (type == 2 || type == 3) return QuantFormat{QuantKind::kQ4, 32};
  if (type == 8) return QuantFormat{QuantKind::kQ8, 32};
  return absl::InvalidArgumentError(absl::StrCat("GGUF type ", type, " has no rounding-free q4/q8 form; it is requantized"));
}

absl::Status GgufBlocksToQuantized(uint32_t type, const uint8_t* src, int64_t rows, int64_t cols, const QuantLayout& l, uint8_t* out) {
  if (cols % 32 != 0) return absl::InvalidArgumentError(absl::StrCat("GGUF rows of ", cols, " values are not whole blocks of 32"));
  std::memset(out, 0, l.bytes);
  const size_t blocks = static_cast<size_t>(rows) * static_cast<size_t>(cols) / 32;
  for (size_t b = 0; b < blocks; ++b) {
    if (type == 2 || type == 3) {
      const size_t bytes = type == 2 ? 18 : 20;
      const uint8_t* blk = src + b * bytes;
      const uint16_t d = LoadHalf(blk);
      uint16_t m;
      if (type == 2) {
        // value = (q - 8) d = q d + (-8 d): exact in fp16 unless it overflows.
        const float mf = -8.0f * F16ToF32(d);
        m = F32ToF16(mf);
        if (!std::isfinite(F16ToF32(m)) || F16ToF32(m) != mf) {
          return absl::OutOfRangeError(absl::StrCat("a Q4_0 block's minimum -8 x ", F16ToF32(d), " does not fit fp16"));
        }
      } else {
        m = LoadHalf(blk + 2);
      }
      StoreHalf(out + l.scales_offset + b * 2, d);
      StoreHalf(out + l.mins_offset + b * 2, m);
      const uint8_t* nib = blk + (type == 2 ? 2 : 4);
      uint8_t* v = out + b * 16;
      // GGUF: value j in the low nibble of byte j, value j + 16 in its high nibble.
      for (int j = 0; j < 32; ++j) {
        const uint8_t qv = j < 16 ? (nib[j] & 0xF) : (nib[j - 16] >> 4);
        v[j / 2] |= static_cast<uint8_t>(j % 2 == 0 ? qv : qv << 4);
      }
    } else if (type == 8) {
      const uint8_t* blk = src + b * 34;
      StoreHalf(out + l.scales_offset + b * 2, LoadHalf(blk));
      std::memcpy(out + b * 32, blk + 2, 32);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("GGUF type ", type, " has no rounding-free q4/q8 form"));
    }
  }
  return absl::OkStatus();
}

}  // namespace ferry
