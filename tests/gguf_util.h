// A GGUF writer for tests: builds files byte by byte so a test can also write lies (wrong counts,
// offsets, types) that no real writer would.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace ferry::testing {

class GgufBuilder {
 public:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> ne;
    uint32_t type;
    std::string data;
    int64_t offset_override = -1;
  };
  uint32_t version = 3;
  uint32_t alignment = 32;
  int64_t kv_count_override = -1, tensor_count_override = -1;

  void U32(const std::string& key, uint32_t v) { Key(key, 4), Put(&v, 4); }
  void I32(const std::string& key, int32_t v) { Key(key, 5), Put(&v, 4); }
  void F32(const std::string& key, float v) { Key(key, 6), Put(&v, 4); }
  void Bool(const std::string& key, bool v) {
    const uint8_t b = v;
    Key(key, 7), Put(&b, 1);
  }
  void Str(const std::string& key, const std::string& v) { Key(key, 8), PutString(v); }
  void Strings(const std::string& key, const std::vector<std::string>& v) {
    Key(key, 9);
    const uint32_t t = 8;
    const uint64_t n = v.size();
    Put(&t, 4), Put(&n, 8);
    for (const auto& s : v) PutString(s);
  }
  void I32s(const std::string& key, const std::vector<int32_t>& v) {
    Key(key, 9);
    const uint32_t t = 5;
    const uint64_t n = v.size();
    Put(&t, 4), Put(&n, 8);
    for (int32_t x : v) Put(&x, 4);
  }
  void F32s(const std::string& key, const std::vector<float>& v) {
    Key(key, 9);
    const uint32_t t = 6;
    const uint64_t n = v.size();
    Put(&t, 4), Put(&n, 8);
    for (float x : v) Put(&x, 4);
  }
  // Raw bytes of one key/value (for lies).
  void RawKv(const std::string& bytes) { kv_ += bytes, ++kvs_; }
  void AddTensor(Tensor t) { tensors_.push_back(std::move(t)); }
  void AddF32(const std::string& name, std::vector<uint64_t> ne, const std::vector<float>& values) {
    std::string data(values.size() * 4, '\0');
    std::memcpy(data.data(), values.data(), data.size());
    tensors_.push_back({name, std::move(ne), 0, std::move(data)});
  }

  std::string Build() const {
    std::string out = "GGUF";
    Append(&out, &version, 4);
    const uint64_t nt = tensor_count_override >= 0 ? static_cast<uint64_t>(tensor_count_override) : tensors_.size();
    const uint64_t nk = kv_count_override >= 0 ? static_cast<uint64_t>(kv_count_override) : kvs_ + (alignment != 32 ? 1 : 0);
    Append(&out, &nt, 8);
    Append(&out, &nk, 8);
    out += kv_;
    if (alignment != 32) {
      AppendString(&out, "general.alignment");
      const uint32_t t = 4;
      Append(&out, &t, 4);
      Append(&out, &alignment, 4);
    }
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      AppendString(&out, t.name);
      const uint32_t nd = static_cast<uint32_t>(t.ne.size());
      Append(&out, &nd, 4);
      for (uint64_t d : t.ne) Append(&out, &d, 8);
      Append(&out, &t.type, 4);
      const uint64_t off = t.offset_override >= 0 ? static_cast<uint64_t>(t.offset_override) : offset;
      Append(&out, &off, 8);
      offsets.push_back(offset);
      offset += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    out.resize((out.size() + alignment - 1) / alignment * alignment, '\0');
    const size_t data_start = out.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      out.resize(data_start + offsets[i], '\0');
      out += tensors_[i].data;
    }
    return out;
  }

 private:
  void Key(const std::string& key, uint32_t type) {
    PutString(key);
    Put(&type, 4);
    ++kvs_;
  }
  void Put(const void* p, size_t n) { kv_.append(static_cast<const char*>(p), n); }
  void PutString(const std::string& s) {
    const uint64_t n = s.size();
    Put(&n, 8);
    kv_ += s;
  }
  static void Append(std::string* out, const void* p, size_t n) { out->append(static_cast<const char*>(p), n); }
  static void AppendString(std::string* out, const std::string& s) {
    const uint64_t n = s.size();
    Append(out, &n, 8);
    *out += s;
  }
  std::string kv_;
  uint64_t kvs_ = 0;
  std::vector<Tensor> tensors_;
};

}  // namespace ferry::testing
