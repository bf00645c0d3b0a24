#include "io/gguf.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "base/dtype.h"
#include "base/status.h"

namespace ferry::io {
namespace {

constexpr uint64_t kMaxString = 64ull << 20;        // a key, a name or one metadata string
constexpr uint64_t kMaxArray = 1ull << 24;          // items in one metadata array (vocabularies are < 2^20)
constexpr uint64_t kMaxMetadataBytes = 1ull << 30;  // all metadata together
constexpr uint64_t kMaxTensors = 1ull << 20;

absl::Status Corrupt(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": corrupt GGUF: ", what));
}

// Sequential reads of the header through a buffer, never past the end of the file.
class HeaderReader {
 public:
  HeaderReader(int fd, uint64_t size, const std::string& path) : fd_(fd), size_(size), path_(path) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }

  absl::Status Bytes(void* dst, uint64_t n, const char* what) {
    if (n > left()) return Corrupt(path_, absl::StrCat(what, " at byte ", pos_, " runs past the end of the ", size_, "-byte file"));
    char* out = static_cast<char*>(dst);
    while (n > 0) {
      if (buf_pos_ == buf_.size()) {
        const uint64_t chunk = std::min<uint64_t>(1 << 20, size_ - (pos_));
        buf_.resize(chunk);
        FERRY_RETURN_IF_ERROR(PreadFull(fd_, buf_.data(), chunk, pos_, path_));
        buf_pos_ = 0;
      }
      const uint64_t take = std::min<uint64_t>(n, buf_.size() - buf_pos_);
      std::memcpy(out, buf_.data() + buf_pos_, take);
      out += take, buf_pos_ += take, pos_ += take, n -= take;
    }
    return absl::OkStatus();
  }
  template <typename T>
  absl::StatusOr<T> Scalar(const char* what) {
    T v;
    FERRY_RETURN_IF_ERROR(Bytes(&v, sizeof(T), what));
    return v;
  }
  absl::StatusOr<std::string> String(const char* what) {
    FERRY_ASSIGN_OR_RETURN(const uint64_t n, Scalar<uint64_t>(what));
    if (n > kMaxString || n > left()) {
      return Corrupt(path_, absl::StrCat(what, " at byte ", pos_ - 8, " claims ", n, " bytes (", left(), " left in the file)"));
    }
    std::string s(n, '\0');
    FERRY_RETURN_IF_ERROR(Bytes(s.data(), n, what));
    return s;
  }

 private:
  int fd_;
  uint64_t size_, pos_ = 0;
  const std::string& path_;
  std::string buf_;
  size_t buf_pos_ = 0;
};

const char* ValueTypeName(uint32_t t) {
  static const char* kNames[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
  return t < 13 ? kNames[t] : "unknown";
}

// Size of a scalar of type t (0 for strings and arrays); -1 for unknown types.
int ScalarSize(uint32_t t) {
  switch (static_cast<GgufValueType>(t)) {
    case GgufValueType::kU8: case GgufValueType::kI8: case GgufValueType::kBool: return 1;
    case GgufValueType::kU16: case GgufValueType::kI16: return 2;
    case GgufValueType::kU32: case GgufValueType::kI32: case GgufValueType::kF32: return 4;
    case GgufValueType::kU64: case GgufValueType::kI64: case GgufValueType::kF64: return 8;
    case GgufValueType::kString: case GgufValueType::kArray: return 0;
  }
  return -1;
}

// Reads one scalar of type t into v (integers into i or u, floats into f, bools into b and u).
absl::Status ReadScalar(HeaderReader& r, uint32_t t, GgufValue* v, const std::string& path, const std::string& key) {
  switch (static_cast<GgufValueType>(t)) {
    case GgufValueType::kU8: { FERRY_ASSIGN_OR_RETURN(uint8_t x, r.Scalar<uint8_t>("a u8")); v->u = x; v->i = x; return absl::OkStatus(); }
    case GgufValueType::kI8: { FERRY_ASSIGN_OR_RETURN(int8_t x, r.Scalar<int8_t>("an i8")); v->i = x; return absl::OkStatus(); }
    case GgufValueType::kU16: { FERRY_ASSIGN_OR_RETURN(uint16_t x, r.Scalar<uint16_t>("a u16")); v->u = x; v->i = x; return absl::OkStatus(); }
    case GgufValueType::kI16: { FERRY_ASSIGN_OR_RETURN(int16_t x, r.Scalar<int16_t>("an i16")); v->i = x; return absl::OkStatus(); }
    case GgufValueType::kU32: { FERRY_ASSIGN_OR_RETURN(uint32_t x, r.Scalar<uint32_t>("a u32")); v->u = x; v->i = x; return absl::OkStatus(); }
    case GgufValueType::kI32: { FERRY_ASSIGN_OR_RETURN(int32_t x, r.Scalar<int32_t>("an i32")); v->i = x; return absl::OkStatus(); }
    case GgufValueType::kU64: { FERRY_ASSIGN_OR_RETURN(uint64_t x, r.Scalar<uint64_t>("a u64")); v->u = x; v->i = static_cast<int64_t>(std::min<uint64_t>(x, INT64_MAX)); return absl::OkStatus(); }
    case GgufValueType::kI64: { FERRY_ASSIGN_OR_RETURN(int64_t x, r.Scalar<int64_t>("an i64")); v->i = x; return absl::OkStatus(); }
    case GgufValueType::kF32: { FERRY_ASSIGN_OR_RETURN(float x, r.Scalar<float>("an f32")); v->f = x; return absl::OkStatus(); }
    case GgufValueType::kF64: { FERRY_ASSIGN_OR_RETURN(double x, r.Scalar<double>("an f64")); v->f = x; return absl::OkStatus(); }
    case GgufValueType::kBool: {
      FERRY_ASSIGN_OR_RETURN(uint8_t x, r.Scalar<uint8_t>("a bool"));
      if (x > 1) return Corrupt(path, absl::StrCat("key \"", key, "\": bool value ", int{x}, " is neither 0 nor 1"));
      v->b = x != 0, v->u = x, v->i = x;
      return absl::OkStatus();
    }
    case GgufValueType::kString: { FERRY_ASSIGN_OR_RETURN(v->s, r.String("a string value")); return absl::OkStatus(); }
    case GgufValueType::kArray: break;
  }
  return Corrupt(path, absl::StrCat("key \"", key, "\" has unknown value type ", t));
}

bool IsSigned(GgufValueType t) {
  return t == GgufValueType::kI8 || t == GgufValueType::kI16 || t == GgufValueType::kI32 || t == GgufValueType::kI64;
}
bool IsInteger(GgufValueType t) {
  return IsSigned(t) || t == GgufValueType::kU8 || t == GgufValueType::kU16 || t == GgufValueType::kU32 || t == GgufValueType::kU64;
}

float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return F16ToF32(h);
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 packed bytes.
void ScaleMinK4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace

const char* GgmlTypeName(uint32_t type) {
  switch (type) {
    case 0: return "F32"; case 1: return "F16"; case 2: return "Q4_0"; case 3: return "Q4_1"; case 6: return "Q5_0";
    case 7: return "Q5_1"; case 8: return "Q8_0"; case 9: return "Q8_1"; case 10: return "Q2_K"; case 11: return "Q3_K";
    case 12: return "Q4_K"; case 13: return "Q5_K"; case 14: return "Q6_K"; case 15: return "Q8_K"; case 16: return "IQ2_XXS";
    case 17: return "IQ2_XS"; case 18: return "IQ3_XXS"; case 19: return "IQ1_S"; case 20: return "IQ4_NL"; case 21: return "IQ3_S";
    case 22: return "IQ2_S"; case 23: return "IQ4_XS"; case 24: return "I8"; case 25: return "I16"; case 26: return "I32";
    case 27: return "I64"; case 28: return "F64"; case 29: return "IQ1_M"; case 30: return "BF16"; case 34: return "TQ1_0";
    case 35: return "TQ2_0"; case 39: return "MXFP4";
  }
  return "unknown";
}

bool GgmlBlock(uint32_t type, int64_t* elements, int64_t* bytes) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32: *elements = 1, *bytes = 4; return true;
    case GgmlType::kF16: case GgmlType::kBF16: *elements = 1, *bytes = 2; return true;
    case GgmlType::kQ4_0: *elements = 32, *bytes = 18; return true;
    case GgmlType::kQ4_1: *elements = 32, *bytes = 20; return true;
    case GgmlType::kQ5_0: *elements = 32, *bytes = 22; return true;
    case GgmlType::kQ5_1: *elements = 32, *bytes = 24; return true;
    case GgmlType::kQ8_0: *elements = 32, *bytes = 34; return true;
    case GgmlType::kQ4_K: *elements = 256, *bytes = 144; return true;
    case GgmlType::kQ5_K: *elements = 256, *bytes = 176; return true;
    case GgmlType::kQ6_K: *elements = 256, *bytes = 210; return true;
  }
  return false;
}

int64_t GgufTensor::rows() const {
  int64_t r = 1;
  for (size_t i = 1; i < ne.size(); ++i) r *= static_cast<int64_t>(ne[i]);
  return r;
}

int64_t GgufTensor::row_bytes() const {
  int64_t el = 1, by = 1;
  GgmlBlock(type, &el, &by);
  return static_cast<int64_t>(ne[0]) / el * by;
}

std::vector<int64_t> GgufTensor::shape() const {
  std::vector<int64_t> s;
  for (size_t i = ne.size(); i-- > 0;) s.push_back(static_cast<int64_t>(ne[i]));
  return s;
}

void DequantizeGgml(uint32_t type, const void* src_v, float* y, int64_t n) {
  const uint8_t* src = static_cast<const uint8_t*>(src_v);
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      std::memcpy(y, src, static_cast<size_t>(n) * 4);
      return;
    case GgmlType::kF16:
      ConvertToF32(DType::kF16, src, y, static_cast<size_t>(n));
      return;
    case GgmlType::kBF16:
      ConvertToF32(DType::kBF16, src, y, static_cast<size_t>(n));
      return;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 18, y += 32) {
        const float d = Half(src);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * static_cast<float>((src[2 + j] & 0xF) - 8);
          y[j + 16] = d * static_cast<float>((src[2 + j] >> 4) - 8);
        }
      }
      return;
    case GgmlType::kQ4_1:
      for (int64_t b = 0; b < n / 32; ++b, src += 20, y += 32) {
        const float d = Half(src), m = Half(src + 2);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * static_cast<float>(src[4 + j] & 0xF) + m;
          y[j + 16] = d * static_cast<float>(src[4 + j] >> 4) + m;
        }
      }
      return;
    case GgmlType::kQ5_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 22, y += 32) {
        const float d = Half(src);
        uint32_t qh;
        std::memcpy(&qh, src + 2, 4);
        for (int j = 0; j < 16; ++j) {
          const int lo = (src[6 + j] & 0xF) | (((qh >> j) & 1) << 4);
          const int hi = (src[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          y[j] = d * static_cast<float>(lo - 16);
          y[j + 16] = d * static_cast<float>(hi - 16);
        }
      }
      return;
    case GgmlType::kQ5_1:
      for (int64_t b = 0; b < n / 32; ++b, src += 24, y += 32) {
        const float d = Half(src), m = Half(src + 2);
        uint32_t qh;
        std::memcpy(&qh, src + 4, 4);
        for (int j = 0; j < 16; ++j) {
          const int lo = (src[8 + j] & 0xF) | (((qh >> j) & 1) << 4);
          const int hi = (src[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          y[j] = d * static_cast<float>(lo) + m;
          y[j + 16] = d * static_cast<float>(hi) + m;
        }
      }
      return;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 34, y += 32) {
        const float d = Half(src);
        for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(src[2 + j])) * d;
      }
      return;
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K: {
      const bool five = static_cast<GgmlType>(type) == GgmlType::kQ5_K;
      const int block_bytes = five ? 176 : 144;
      for (int64_t b = 0; b < n / 256; ++b, src += block_bytes, y += 256) {
        const float d = Half(src), dmin = Half(src + 2);
        const uint8_t* scales = src + 4;
        const uint8_t* qh = src + 16;               // Q5_K only: 32 bytes, bit s of byte l is sub-block s
        const uint8_t* qs = src + (five ? 48 : 16);  // 128 bytes: sub-blocks 2i, 2i+1 are the low, high nibbles of qs[32i..]
        for (int s = 0; s < 8; ++s) {
          int sc, m;
          ScaleMinK4(s, scales, &sc, &m);
          const float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(m);
          for (int l = 0; l < 32; ++l) {
            int q = (qs[(s / 2) * 32 + l] >> (4 * (s % 2))) & 0xF;
            if (five) q |= ((qh[l] >> s) & 1) << 4;
            y[s * 32 + l] = ds * static_cast<float>(q) - dm;
          }
        }
      }
      return;
    }
    case GgmlType::kQ6_K:
      for (int64_t b = 0; b < n / 256; ++b, src += 210, y += 256) {
        const uint8_t* ql = src;
        const uint8_t* qh = src + 128;
        const int8_t* scales = reinterpret_cast<const int8_t*>(src + 192);
        const float d = Half(src + 208);
        for (int e = 0; e < 256; ++e) {
          const int h = e / 128, r = e % 128;
          const int lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
          const int hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
          const float ds = d * static_cast<float>(scales[e / 16]);
          y[e] = ds * static_cast<float>(static_cast<int8_t>(lo | (hi << 4)) - 32);
        }
      }
      return;
  }
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  FERRY_ASSIGN_OR_RETURN(f->fd_, ScopedFd::OpenForRead(path));
  FERRY_ASSIGN_OR_RETURN(const uint64_t size, FileSize(f->fd_.get(), path));
  HeaderReader r(f->fd_.get(), size, path);
  char magic[4];
  if (size < 24) return Corrupt(path, absl::StrCat("file is ", size, " bytes, shorter than a GGUF header"));
  FERRY_RETURN_IF_ERROR(r.Bytes(magic, 4, "the magic"));
  if (std::memcmp(magic, "GGUF", 4) != 0) return Corrupt(path, "does not start with the GGUF magic");
  FERRY_ASSIGN_OR_RETURN(f->version_, r.Scalar<uint32_t>("the version"));
  if (f->version_ != 2 && f->version_ != 3) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": GGUF version ", f->version_, " is not supported (2 and 3 are)"));
  }
  FERRY_ASSIGN_OR_RETURN(const uint64_t n_tensors, r.Scalar<uint64_t>("the tensor count"));
  FERRY_ASSIGN_OR_RETURN(const uint64_t n_kv, r.Scalar<uint64_t>("the metadata count"));
  // Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info 8 + 4 + 8 + 4 + 8.
  if (n_kv > r.left() / 13) return Corrupt(path, absl::StrCat("metadata count ", n_kv, " does not fit in the file"));
  if (n_tensors > kMaxTensors || n_tensors > r.left() / 32) {
    return Corrupt(path, absl::StrCat("tensor count ", n_tensors, " does not fit in the file"));
  }
  uint64_t metadata_bytes = 0;
  for (uint64_t k = 0; k < n_kv; ++k) {
    FERRY_ASSIGN_OR_RETURN(std::string key, r.String("a metadata key"));
    if (f->metadata_.count(key)) return Corrupt(path, absl::StrCat("metadata key \"", key, "\" appears twice"));
    FERRY_ASSIGN_OR_RETURN(const uint32_t type, r.Scalar<uint32_t>("a value type"));
    GgufValue v;
    if (ScalarSize(type) < 0) return Corrupt(path, absl::StrCat("key \"", key, "\" has unknown value type ", type));
    v.type = static_cast<GgufValueType>(type);
    const uint64_t before = r.pos();
    if (v.type == GgufValueType::kArray) {
      FERRY_ASSIGN_OR_RETURN(const uint32_t item, r.Scalar<uint32_t>("an array type"));
      FERRY_ASSIGN_OR_RETURN(const uint64_t count, r.Scalar<uint64_t>("an array length"));
      const int item_size = ScalarSize(item);
      if (item_size < 0) return Corrupt(path, absl::StrCat("key \"", key, "\" is an array of unknown type ", item));
      if (item == static_cast<uint32_t>(GgufValueType::kArray)) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": key \"", key, "\" is an array of arrays, which ferry does not read"));
      }
      const uint64_t min_item = item_size == 0 ? 8 : static_cast<uint64_t>(item_size);
      if (count > kMaxArray || count > r.left() / min_item) {
        return Corrupt(path, absl::StrCat("key \"", key, "\": array of ", count, " ", ValueTypeName(item), " does not fit in the file"));
      }
      v.array_type = static_cast<GgufValueType>(item);
      GgufValue x;
      for (uint64_t i = 0; i < count; ++i) {
        FERRY_RETURN_IF_ERROR(ReadScalar(r, item, &x, path, key));
        if (v.array_type == GgufValueType::kString) {
          v.strings.push_back(std::move(x.s));
        } else if (v.array_type == GgufValueType::kF32 || v.array_type == GgufValueType::kF64) {
          v.floats.push_back(x.f);
        } else {
          v.ints.push_back(v.array_type == GgufValueType::kU64 ? static_cast<int64_t>(std::min<uint64_t>(x.u, INT64_MAX)) : x.i);
        }
      }
    } else {
      FERRY_RETURN_IF_ERROR(ReadScalar(r, type, &v, path, key));
    }
    metadata_bytes += r.pos() - before;
    if (metadata_bytes > kMaxMetadataBytes) return Corrupt(path, "metadata exceeds 1 GiB");
    f->metadata_.emplace(std::move(key), std::move(v));
  }
  if (auto it = f->metadata_.find("general.alignment"); it != f->metadata_.end()) {
    const GgufValue& a = it->second;
    if (!IsInteger(a.type) || a.i <= 0 || a.i > (1 << 20) || (a.i & (a.i - 1)) != 0) {
      return Corrupt(path, "general.alignment must be a power of two up to 1 MiB");
    }
    f->alignment_ = static_cast<uint64_t>(a.i);
  }
  std::vector<uint64_t> rel_offsets;
  for (uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensor info;
    FERRY_ASSIGN_OR_RETURN(info.name, r.String("a tensor name"));
    FERRY_ASSIGN_OR_RETURN(const uint32_t n_dims, r.Scalar<uint32_t>("a tensor's dimension count"));
    if (n_dims < 1 || n_dims > 4) return Corrupt(path, absl::StrCat("tensor \"", info.name, "\" has ", n_dims, " dimensions (1-4)"));
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      FERRY_ASSIGN_OR_RETURN(const uint64_t ne, r.Scalar<uint64_t>("a tensor dimension"));
      if (ne == 0 || ne > (1ull << 40) || numel > (1ull << 48) / ne) {
        return Corrupt(path, absl::StrCat("tensor \"", info.name, "\" has dimension ", ne, " (zero or overflowing)"));
      }
      numel *= ne;
      info.ne.push_back(ne);
    }
    FERRY_ASSIGN_OR_RETURN(info.type, r.Scalar<uint32_t>("a tensor type"));
    FERRY_ASSIGN_OR_RETURN(const uint64_t rel, r.Scalar<uint64_t>("a tensor offset"));
    int64_t block = 0, block_bytes = 0;
    if (!GgmlBlock(info.type, &block, &block_bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor \"", info.name, "\" has ggml type ", info.type, " (",
                                                     GgmlTypeName(info.type), "), which ferry does not read; supported: F32, F16, BF16, "
                                                     "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"));
    }
    if (info.ne[0] % static_cast<uint64_t>(block) != 0) {
      return Corrupt(path, absl::StrCat("tensor \"", info.name, "\" has rows of ", info.ne[0], " elements, not a multiple of ",
                                        GgmlTypeName(info.type), "'s block of ", block));
    }
    info.bytes = numel / static_cast<uint64_t>(block) * static_cast<uint64_t>(block_bytes);
    if (rel % f->alignment_ != 0) return Corrupt(path, absl::StrCat("tensor \"", info.name, "\" offset ", rel, " is not aligned"));
    if (f->by_name_.count(info.name)) return Corrupt(path, absl::StrCat("tensor \"", info.name, "\" appears twice"));
    f->by_name_[info.name] = f->tensors_.size();
    rel_offsets.push_back(rel);
    f->tensors_.push_back(std::move(info));
  }
  const uint64_t data_start = (r.pos() + f->alignment_ - 1) / f->alignment_ * f->alignment_;
  // A vocab-only file (no tensors) may end right after its header, without the padding.
  if (data_start > size && !f->tensors_.empty()) return Corrupt(path, "the data section starts past the end of the file");
  const uint64_t data_size = data_start > size ? 0 : size - data_start;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (size_t i = 0; i < f->tensors_.size(); ++i) {
    GgufTensor& t = f->tensors_[i];
    const uint64_t rel = rel_offsets[i];
    if (rel > data_size || t.bytes > data_size - rel) {
      return Corrupt(path, absl::StrCat("tensor \"", t.name, "\" bytes [", rel, ", ", rel + t.bytes, ") lie outside the ", data_size,
                                        "-byte data section (truncated file?)"));
    }
    t.offset = data_start + rel;
    ranges.emplace_back(rel, rel + t.bytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return Corrupt(path, "two tensors' bytes overlap");
  }
  return f;
}

const GgufValue* GgufFile::Find(const std::string& key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::FindTensor(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

namespace {
absl::Status Missing(const std::string& path, const std::string& key) {
  return absl::NotFoundError(absl::StrCat(path, ": GGUF metadata lacks \"", key, "\""));
}
absl::Status WrongType(const std::string& path, const std::string& key, const char* want, const GgufValue& v) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": GGUF metadata \"", key, "\" is a ",
                                                 ValueTypeName(static_cast<uint32_t>(v.type)), ", expected ", want));
}
}  // namespace

absl::StatusOr<std::string> GgufFile::String(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(path_, key);
  if (v->type != GgufValueType::kString) return WrongType(path_, key, "a string", *v);
  return v->s;
}

absl::StatusOr<uint64_t> GgufFile::Uint(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(path_, key);
  if (!IsInteger(v->type)) return WrongType(path_, key, "an integer", *v);
  if (IsSigned(v->type) && v->i < 0) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": GGUF metadata \"", key, "\" is negative (", v->i, ")"));
  }
  return IsSigned(v->type) ? static_cast<uint64_t>(v->i) : v->u;
}

absl::StatusOr<double> GgufFile::Float(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(path_, key);
  if (v->type == GgufValueType::kF32 || v->type == GgufValueType::kF64) return v->f;
  if (IsInteger(v->type)) return IsSigned(v->type) ? static_cast<double>(v->i) : static_cast<double>(v->u);
  return WrongType(path_, key, "a number", *v);
}

absl::StatusOr<bool> GgufFile::Bool(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(path_, key);
  if (v->type != GgufValueType::kBool) return WrongType(path_, key, "a bool", *v);
  return v->b;
}

absl::StatusOr<const std::vector<std::string>*> GgufFile::Strings(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(path_, key);
  if (v->type != GgufValueType::kArray || v->array_type != GgufValueType::kString) return WrongType(path_, key, "an array of strings", *v);
  return &v->strings;
}

absl::StatusOr<const std::vector<int64_t>*> GgufFile::Ints(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(path_, key);
  if (v->type != GgufValueType::kArray || !(IsInteger(v->array_type) || v->array_type == GgufValueType::kBool)) {
    return WrongType(path_, key, "an array of integers", *v);
  }
  return &v->ints;
}

absl::StatusOr<const std::vector<double>*> GgufFile::Floats(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(path_, key);
  if (v->type != GgufValueType::kArray || !(v->array_type == GgufValueType::kF32 || v->array_type == GgufValueType::kF64)) {
    return WrongType(path_, key, "an array of floats", *v);
  }
  return &v->floats;
}

absl::Status GgufFile::ReadRaw(const GgufTensor& t, uint64_t begin, void* dst, size_t n) const {
  if (begin > t.bytes || n > t.bytes - begin) {
    return absl::OutOfRangeError(absl::StrCat("read of [", begin, ", ", begin + n, ") outside tensor \"", t.name, "\""));
  }
  return PreadFull(fd_.get(), dst, n, t.offset + begin, path_);
}

absl::Status GgufFile::ReadRowsF32(const GgufTensor& t, int64_t row0, int64_t rows, float* dst) const {
  if (row0 < 0 || rows < 0 || row0 > t.rows() || rows > t.rows() - row0) {
    return absl::OutOfRangeError(absl::StrCat("rows [", row0, ", ", row0 + rows, ") outside tensor \"", t.name, "\""));
  }
  const uint64_t rb = static_cast<uint64_t>(t.row_bytes());
  std::vector<uint8_t> raw(rb * static_cast<uint64_t>(rows));
  FERRY_RETURN_IF_ERROR(ReadRaw(t, rb * static_cast<uint64_t>(row0), raw.data(), raw.size()));
  DequantizeGgml(t.type, raw.data(), dst, t.row_elements() * rows);
  return absl::OkStatus();
}

}  // namespace ferry::io
