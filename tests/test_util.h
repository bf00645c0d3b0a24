// Test helpers: temporary directories and a safetensors writer for building good and bad files.
#pragma once

#include <unistd.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "base/dtype.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ferry::testing {

// True in an AddressSanitizer build (scripts/sanitize), where the CPU kernels run 10-20x slower:
// the few tests that train or score long texts run a smaller problem there (and say so).
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kUnderAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kUnderAddressSanitizer = true;
#else
inline constexpr bool kUnderAddressSanitizer = false;
#endif
#else
inline constexpr bool kUnderAddressSanitizer = false;
#endif

// "a-b.c" -> "a_b_c": a GoogleTest parameter name.
inline std::string ParamName(const char* param) {
  std::string s = param;
  for (char& ch : s) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
  return s;
}

// Test data and model folders: $FERRY_TEST_DATA_DIR / $FERRY_TEST_MODEL_DIR when set (a build
// copied to another machine), else the source tree this build came from.
inline std::string DataDir() {
  const char* env = std::getenv("FERRY_TEST_DATA_DIR");
  return env != nullptr ? env : FERRY_TEST_DATA_DIR;
}
inline std::string ModelDir() {
  const char* env = std::getenv("FERRY_TEST_MODEL_DIR");
  return env != nullptr ? env : FERRY_TEST_MODEL_DIR;
}

// The model-family goldens (models/goldens): $FERRY_TEST_GOLDENS_DIR when set.
inline std::string GoldensDir() {
  const char* env = std::getenv("FERRY_TEST_GOLDENS_DIR");
  return env != nullptr ? env : FERRY_TEST_GOLDENS_DIR;
}

// A directory removed when the object dies.
// Where scripts/fetch-models caches what it fetches from PyPI (FERRY_CACHE, else ~/.cache/ferry).
inline std::string CacheDir() {
  if (const char* c = std::getenv("FERRY_CACHE"); c != nullptr && *c != 0) return c;
  const char* home = std::getenv("HOME");
  return std::string(home != nullptr ? home : "/root") + "/.cache/ferry";
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "ferry-test-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Flips bit 4 of the byte at `offset` of the file (a corruption the checksums must catch).
inline void FlipByte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good()) << path;
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  ASSERT_TRUE(f.read(&c, 1).good()) << path << " @" << offset;
  c ^= 0x10;
  f.seekp(static_cast<std::streamoff>(offset));
  ASSERT_TRUE(f.write(&c, 1).good()) << path;
}

inline void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

struct StTensor {
  std::string name;
  ferry::DType dtype = ferry::DType::kF32;
  std::vector<int64_t> shape;
  std::string bytes;  // raw little-endian data
};

// A tensor of `values` stored as `dtype`.
inline StTensor MakeTensor(const std::string& name, ferry::DType dtype, std::vector<int64_t> shape,
                           const std::vector<float>& values) {
  StTensor t{name, dtype, std::move(shape), std::string(values.size() * ferry::DTypeSize(dtype), '\0')};
  ferry::ConvertFromF32(dtype, values.data(), t.bytes.data(), values.size());
  return t;
}

inline std::vector<float> RandomValues(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Serializes tensors as safetensors; `header_override` replaces the JSON header when non-empty.
inline std::string SerializeSafetensors(const std::vector<StTensor>& tensors, const std::string& header_override = "") {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", ferry::DTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string h = header_override.empty() ? header.dump() : header_override;
  while (h.size() % 8 != 0) h += ' ';
  std::string out(8, '\0');
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  return out + h + data;
}

}  // namespace ferry::testing
