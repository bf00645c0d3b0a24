#include "engine/gguf_model.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "base/status.h"
#include "engine/family.h"
#include "engine/tokenizer.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using nlohmann::json;
using offload::Role;

// llama.cpp's tensor names, the same for every architecture it writes ("{L}": the layer).
struct GgufName {
  Role role;
  const char* name;
};
const std::vector<GgufName>& GgufNames() {
  static const std::vector<GgufName> names = {
      {Role::kTokEmbed, "token_embd.weight"},        {Role::kFinalNorm, "output_norm.weight"},
      {Role::kLmHead, "output.weight"},              {Role::kAttnNorm, "blk.{L}.attn_norm.weight"},
      {Role::kQ, "blk.{L}.attn_q.weight"},           {Role::kQBias, "blk.{L}.attn_q.bias"},
      {Role::kK, "blk.{L}.attn_k.weight"},           {Role::kKBias, "blk.{L}.attn_k.bias"},
      {Role::kV, "blk.{L}.attn_v.weight"},           {Role::kVBias, "blk.{L}.attn_v.bias"},
      {Role::kO, "blk.{L}.attn_output.weight"},      {Role::kOBias, "blk.{L}.attn_output.bias"},
      {Role::kQNorm, "blk.{L}.attn_q_norm.weight"},  {Role::kKNorm, "blk.{L}.attn_k_norm.weight"},
      {Role::kFfnNorm, "blk.{L}.ffn_norm.weight"},   {Role::kGate, "blk.{L}.ffn_gate.weight"},
      {Role::kGateBias, "blk.{L}.ffn_gate.bias"},    {Role::kUp, "blk.{L}.ffn_up.weight"},
      {Role::kUpBias, "blk.{L}.ffn_up.bias"},        {Role::kDown, "blk.{L}.ffn_down.weight"},
      {Role::kDownBias, "blk.{L}.ffn_down.bias"},
  };
  return names;
}

// The role and layer of a llama.cpp tensor name; false when it has none.
bool GgufRole(const std::string& name, Role* role, int* layer) {
  int l = -1;
  std::string generic = name;
  if (absl::StartsWith(name, "blk.")) {
    const size_t dot = name.find('.', 4);
    if (dot == std::string::npos || dot == 4 || dot - 4 > 6) return false;
    const std::string digits = name.substr(4, dot - 4);
    if (!std::all_of(digits.begin(), digits.end(), ::isdigit)) return false;
    l = std::stoi(digits);
    generic = "blk.{L}" + name.substr(dot);
  }
  for (const GgufName& g : GgufNames()) {
    if (generic == g.name) {
      *role = g.role;
      *layer = l;
      return true;
    }
  }
  return false;
}

const GgufArch* FindArch(const std::string& arch, const Family** family) {
  for (const Family* f : Families()) {
    for (const GgufArch& a : f->gguf) {
      if (arch == a.arch) {
        *family = f;
        return &a;
      }
    }
  }
  return nullptr;
}

absl::Status Refuse(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

// Presents a GGUF file's tensors under a family's checkpoint names, dequantized.
class GgufTensorSource final : public io::TensorSource {
 public:
  struct Entry {
    io::TensorInfo info;           // the presented tensor (name, dtype, shape, bytes)
    const io::GgufTensor* tensor;  // where it comes from
    int permute_heads = 0;         // > 0: undo llama.cpp's Q/K permutation over this many heads
  };

  explicit GgufTensorSource(std::shared_ptr<io::GgufFile> file) : file_(std::move(file)) {}
  void Add(Entry e) {
    const std::string name = e.info.name;
    entries_.emplace(name, std::move(e));
  }

  const io::TensorInfo* Find(const std::string& name) const override {
    auto it = entries_.find(name);
    return it == entries_.end() ? nullptr : &it->second.info;
  }
  std::vector<std::string> Names() const override {
    std::vector<std::string> names;
    for (const auto& [name, e] : entries_) names.push_back(name);
    return names;
  }
  std::string StorageType(const std::string& name) const override {
    auto it = entries_.find(name);
    return it == entries_.end() ? "?" : io::GgmlTypeName(it->second.tensor->type);
  }

  // Q4_0 / Q4_1 / Q8_0 matrices map onto q4g32 / q8g32 block for block (rows reordered like the
  // float path when llama.cpp permuted them).
  absl::StatusOr<bool> ReadExactQuantized(const std::string& name, const QuantFormat& f, const QuantLayout& layout,
                                          uint8_t* out) const override {
    auto it = entries_.find(name);
    if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("no tensor \"", name, "\" in ", file_->path()));
    const Entry& e = it->second;
    const io::GgufTensor& t = *e.tensor;
    auto mapped = GgufQuantFormat(t.type);
    if (!mapped.ok() || !(*mapped == f) || t.ne.size() != 2) return false;
    const int64_t rows = t.rows(), cols = t.row_elements();
    std::vector<uint8_t> blocks(t.bytes);
    FERRY_RETURN_IF_ERROR(file_->ReadRaw(t, 0, blocks.data(), blocks.size()));
    std::vector<uint8_t> tmp(e.permute_heads > 0 ? layout.bytes : 0);
    uint8_t* dst = e.permute_heads > 0 ? tmp.data() : out;
    std::memset(dst, 0, layout.bytes);
    const absl::Status st = GgufBlocksToQuantized(t.type, blocks.data(), rows, cols, layout, dst);
    if (absl::IsOutOfRange(st)) return false;  // a Q4_0 minimum beyond fp16: quantized from the values
    FERRY_RETURN_IF_ERROR(st);
    if (e.permute_heads > 0) {
      std::memset(out, 0, layout.bytes);
      const int64_t hd = rows / e.permute_heads, half = hd / 2;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t head0 = (r / hd) * hd, w = r % hd;
        CopyQuantizedRow(f, layout, cols, tmp.data(), head0 + 2 * (w % half) + w / half, out, r);
      }
    }
    return true;
  }

  absl::Status Read(const std::string& name, void* dst, size_t dst_bytes) const override {
    const io::TensorInfo* info = Find(name);
    if (info == nullptr) return absl::NotFoundError(absl::StrCat("no tensor \"", name, "\" in ", file_->path()));
    if (dst_bytes != info->bytes) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" is ", info->bytes, " bytes, not ", dst_bytes));
    }
    return ReadRange(name, 0, dst, dst_bytes);
  }

  absl::Status ReadRange(const std::string& name, uint64_t begin, void* dst_v, size_t n) const override {
    auto it = entries_.find(name);
    if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("no tensor \"", name, "\" in ", file_->path()));
    const Entry& e = it->second;
    if (begin > e.info.bytes || n > e.info.bytes - begin) {
      return absl::OutOfRangeError(absl::StrCat("read of [", begin, ", ", begin + n, ") outside tensor \"", name, "\""));
    }
    if (n == 0) return absl::OkStatus();
    const io::GgufTensor& t = *e.tensor;
    const int64_t cols = t.row_elements(), rows = t.rows();
    const size_t es = DTypeSize(e.info.dtype);
    const uint64_t out_row = static_cast<uint64_t>(cols) * es;
    // A 1-D tensor with a permutation (a Q/K bias) is permuted element-wise: treat it as rows of one.
    const bool vector_perm = e.permute_heads > 0 && t.ne.size() == 1;
    const int64_t group = e.permute_heads > 0 ? (vector_perm ? cols : rows / e.permute_heads) : 1;
    const int64_t first = static_cast<int64_t>(begin / out_row), last = static_cast<int64_t>((begin + n - 1) / out_row);
    const int64_t g0 = first / group * group, g1 = std::min(rows, (last / group + 1) * group);
    // Dequantize in chunks of whole groups of about 4M floats.
    const int64_t chunk_rows = std::max<int64_t>(group, (int64_t{4} << 20) / std::max<int64_t>(cols, 1) / group * group);
    char* dst = static_cast<char*>(dst_v);
    std::vector<float> f32, permuted;
    std::vector<char> converted;
    for (int64_t c0 = g0; c0 < g1; c0 += chunk_rows) {
      const int64_t c1 = std::min(g1, c0 + chunk_rows), nrows = c1 - c0;
      f32.resize(static_cast<size_t>(nrows * cols));
      FERRY_RETURN_IF_ERROR(file_->ReadRowsF32(t, c0, nrows, f32.data()));
      const float* src = f32.data();
      if (e.permute_heads > 0) {
        // HF row (i, j) of a head (i < 2, j < half) is llama.cpp's row 2j + i.
        permuted.resize(f32.size());
        if (vector_perm) {
          const int64_t hd = cols / e.permute_heads, half = hd / 2;
          for (int64_t h = 0; h < e.permute_heads; ++h) {
            for (int64_t w = 0; w < hd; ++w) permuted[h * hd + w] = f32[h * hd + 2 * (w % half) + w / half];
          }
        } else {
          const int64_t hd = group, half = hd / 2;
          for (int64_t r = 0; r < nrows; ++r) {
            const int64_t head0 = (r / hd) * hd, w = r % hd;
            const int64_t s = head0 + 2 * (w % half) + w / half;
            std::memcpy(&permuted[r * cols], &f32[s * cols], static_cast<size_t>(cols) * sizeof(float));
          }
        }
        src = permuted.data();
      }
      converted.resize(static_cast<size_t>(nrows * cols) * es);
      ConvertFromF32(e.info.dtype, src, converted.data(), static_cast<size_t>(nrows * cols));
      // Copy the overlap of [c0 * out_row, c1 * out_row) with [begin, begin + n).
      const uint64_t lo = std::max<uint64_t>(begin, static_cast<uint64_t>(c0) * out_row);
      const uint64_t hi = std::min<uint64_t>(begin + n, static_cast<uint64_t>(c1) * out_row);
      if (hi > lo) std::memcpy(dst + (lo - begin), converted.data() + (lo - static_cast<uint64_t>(c0) * out_row), hi - lo);
    }
    return absl::OkStatus();
  }

 private:
  std::shared_ptr<io::GgufFile> file_;
  std::map<std::string, Entry> entries_;
};

}  // namespace

bool IsGgufFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char magic[4] = {};
  const bool ok = ::pread(fd, magic, 4, 0) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
  ::close(fd);
  return ok;
}

absl::StatusOr<std::string> ConfigJsonFromGguf(const io::GgufFile& f) {
  const std::string& path = f.path();
  FERRY_ASSIGN_OR_RETURN(const std::string arch, f.String("general.architecture"));
  const Family* family = nullptr;
  const GgufArch* a = FindArch(arch, &family);
  if (a == nullptr) {
    std::string known;
    for (const Family* fam : Families()) {
      for (const GgufArch& g : fam->gguf) absl::StrAppend(&known, known.empty() ? "" : ", ", g.arch);
    }
    return Refuse(path, absl::StrCat("GGUF architecture \"", arch, "\" is not supported (ferry runs ", known, ")"));
  }
  if (const io::GgufValue* split = f.Find("split.count"); split != nullptr) {
    FERRY_ASSIGN_OR_RETURN(const uint64_t parts, f.Uint("split.count"));
    if (parts > 1) return Refuse(path, absl::StrCat("is part of a ", parts, "-file split GGUF; merge it first (llama-gguf-split --merge)"));
  }
  const std::string p = arch + ".";
  // Every key of the architecture must be one ferry understands.
  static const std::vector<std::string> kKnown = {
      "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
      "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count", "vocab_size", "attention.key_length",
      "attention.value_length", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
      "rope.scaling.finetuned", "expert_count", "expert_used_count"};
  for (const auto& [key, value] : f.metadata()) {
    if (!absl::StartsWith(key, p)) continue;
    const std::string rest = key.substr(p.size());
    if (std::find(kKnown.begin(), kKnown.end(), rest) == kKnown.end()) {
      return Refuse(path, absl::StrCat("GGUF metadata \"", key, "\" is not supported"));
    }
  }
  auto uint = [&](const std::string& key) -> absl::StatusOr<uint64_t> {
    FERRY_ASSIGN_OR_RETURN(const uint64_t v, f.Uint(p + key));
    if (v == 0 || v > (1u << 30)) return Refuse(path, absl::StrCat("GGUF metadata \"", p, key, "\" is ", v));
    return v;
  };
  auto has = [&](const std::string& key) { return f.Find(p + key) != nullptr; };
  json c;
  c["model_type"] = a->model_type;
  FERRY_ASSIGN_OR_RETURN(const uint64_t layers, uint("block_count"));
  FERRY_ASSIGN_OR_RETURN(const uint64_t hidden, uint("embedding_length"));
  FERRY_ASSIGN_OR_RETURN(const uint64_t ffn, uint("feed_forward_length"));
  FERRY_ASSIGN_OR_RETURN(const uint64_t heads, uint("attention.head_count"));
  c["num_hidden_layers"] = layers;
  c["hidden_size"] = hidden;
  c["intermediate_size"] = ffn;
  c["num_attention_heads"] = heads;
  c["num_key_value_heads"] = heads;
  if (has("attention.head_count_kv")) {
    FERRY_ASSIGN_OR_RETURN(c["num_key_value_heads"], uint("attention.head_count_kv"));
  }
  c["max_position_embeddings"] = 2048;
  if (has("context_length")) {
    FERRY_ASSIGN_OR_RETURN(c["max_position_embeddings"], uint("context_length"));
  }
  uint64_t head_dim = hidden / heads;
  if (has("attention.key_length")) {
    FERRY_ASSIGN_OR_RETURN(head_dim, uint("attention.key_length"));
    c["head_dim"] = head_dim;
  }
  if (has("attention.value_length")) {
    FERRY_ASSIGN_OR_RETURN(const uint64_t v, uint("attention.value_length"));
    if (v != head_dim) return Refuse(path, absl::StrCat("GGUF value_length ", v, " differs from key_length ", head_dim));
  }
  if (has("rope.dimension_count")) {
    FERRY_ASSIGN_OR_RETURN(const uint64_t rot, uint("rope.dimension_count"));
    if (rot != head_dim) {
      return Refuse(path, absl::StrCat("GGUF rope.dimension_count ", rot, " rotates part of the ", head_dim, "-wide heads, which ", arch,
                                       " does not"));
    }
  }
  for (const char* moe : {"expert_count", "expert_used_count"}) {
    if (has(moe)) {
      FERRY_ASSIGN_OR_RETURN(const uint64_t experts, f.Uint(p + moe));
      if (experts > 0) return Refuse(path, absl::StrCat("GGUF ", p, moe, " is ", experts, ": mixture-of-experts models are not supported"));
    }
  }
  if (has("attention.layer_norm_rms_epsilon")) {
    FERRY_ASSIGN_OR_RETURN(c["rms_norm_eps"], f.Float(p + "attention.layer_norm_rms_epsilon"));
  }
  if (has("rope.freq_base")) {
    FERRY_ASSIGN_OR_RETURN(c["rope_theta"], f.Float(p + "rope.freq_base"));
  }
  if (has("rope.scaling.type")) {
    FERRY_ASSIGN_OR_RETURN(const std::string type, f.String(p + "rope.scaling.type"));
    if (type == "linear" || type == "yarn") {
      json s = {{"rope_type", type}};
      FERRY_ASSIGN_OR_RETURN(s["factor"], f.Float(p + "rope.scaling.factor"));
      if (type == "yarn") {
        FERRY_ASSIGN_OR_RETURN(s["original_max_position_embeddings"], f.Float(p + "rope.scaling.original_context_length"));
      }
      c["rope_scaling"] = s;
    } else if (type != "none") {
      return Refuse(path, absl::StrCat("GGUF rope.scaling.type \"", type, "\" is not supported (none, linear, yarn are)"));
    }
  }
  if (f.FindTensor("rope_freqs.weight") != nullptr) {
    return Refuse(path, "has a rope_freqs.weight tensor (Llama 3.1-style rope scaling factors), which ferry does not read yet");
  }
  const io::GgufTensor* embed = f.FindTensor("token_embd.weight");
  if (embed == nullptr) return Refuse(path, "has no token_embd.weight tensor");
  if (embed->ne.size() != 2) return Refuse(path, "token_embd.weight is not a matrix");
  c["vocab_size"] = embed->ne[1];
  if (has("vocab_size")) {
    FERRY_ASSIGN_OR_RETURN(const uint64_t v, uint("vocab_size"));
    if (v != embed->ne[1]) {
      return absl::DataLossError(absl::StrCat(path, ": GGUF ", p, "vocab_size ", v, " contradicts token_embd.weight's ", embed->ne[1], " rows"));
    }
  }
  c["tie_word_embeddings"] = f.FindTensor("output.weight") == nullptr;
  if (std::string(a->model_type) == "llama") {
    c["attention_bias"] = f.FindTensor("blk.0.attn_q.bias") != nullptr;
    c["mlp_bias"] = f.FindTensor("blk.0.ffn_up.bias") != nullptr;
  }
  for (const auto& [key, field] : std::vector<std::pair<const char*, const char*>>{
           {"tokenizer.ggml.bos_token_id", "bos_token_id"}, {"tokenizer.ggml.eos_token_id", "eos_token_id"},
           {"tokenizer.ggml.padding_token_id", "pad_token_id"}}) {
    if (f.Find(key) == nullptr) continue;
    FERRY_ASSIGN_OR_RETURN(const uint64_t id, f.Uint(key));
    if (id >= embed->ne[1]) return Refuse(path, absl::StrCat("GGUF ", key, " ", id, " is outside the vocabulary"));
    c[field] = id;
  }
  return c.dump(1);
}

absl::StatusOr<GgufModel> OpenGgufModel(const std::string& path, const GgufLoadOptions& options) {
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<io::GgufFile> opened, io::GgufFile::Open(path));
  std::shared_ptr<io::GgufFile> file(std::move(opened));
  GgufModel m;
  FERRY_ASSIGN_OR_RETURN(m.config_json, ConfigJsonFromGguf(*file));
  FERRY_ASSIGN_OR_RETURN(m.config, ModelConfig::FromJson(m.config_json, path + " (config from GGUF metadata)"));
  FERRY_ASSIGN_OR_RETURN(m.tokenizer_json, TokenizerJsonFromGguf(*file));
  if (file->Find("tokenizer.chat_template") != nullptr) {
    FERRY_ASSIGN_OR_RETURN(m.chat_template, file->String("tokenizer.chat_template"));
  }
  FERRY_ASSIGN_OR_RETURN(const std::string arch, file->String("general.architecture"));
  const Family* family = nullptr;
  const GgufArch* a = FindArch(arch, &family);
  const TensorNames names = TensorNames::WithPrefix(*family, family->prefixes.front());
  std::map<Role, bool> matrix;
  for (const RoleSpec& r : GlobalRoles(m.config)) matrix[r.role] = r.matrix;
  for (const RoleSpec& r : LayerRoles(m.config)) matrix[r.role] = r.matrix;
  auto source = std::make_unique<GgufTensorSource>(file);
  for (const io::GgufTensor& t : file->tensors()) {
    Role role;
    int layer;
    if (!GgufRole(t.name, &role, &layer)) return Refuse(path, absl::StrCat("tensor \"", t.name, "\" has no role in the ", family->name, " family"));
    if (layer >= m.config.num_layers) {
      return absl::DataLossError(absl::StrCat(path, ": tensor \"", t.name, "\" is beyond the ", m.config.num_layers, " layers of block_count"));
    }
    GgufTensorSource::Entry e;
    e.tensor = &t;
    e.info.name = layer < 0 ? names.Global(role) : names.Layer(role, layer);
    if (e.info.name.empty()) return Refuse(path, absl::StrCat("tensor \"", t.name, "\" has no name in the ", family->name, " family"));
    e.info.shape = t.shape();
    const bool is_matrix = matrix.count(role) ? matrix[role] : t.ne.size() > 1;
    if (!is_matrix) {
      e.info.dtype = DType::kF32;
    } else if (options.dtype != DType::kF32 && t.type == static_cast<uint32_t>(io::GgmlType::kBF16)) {
      e.info.dtype = DType::kBF16;
    } else if (options.dtype != DType::kF32 && t.type == static_cast<uint32_t>(io::GgmlType::kF16)) {
      e.info.dtype = DType::kF16;
    } else {
      e.info.dtype = options.dtype;
    }
    e.info.bytes = static_cast<uint64_t>(e.info.numel()) * DTypeSize(e.info.dtype);
    if (a->qk_permuted && (role == Role::kQ || role == Role::kK || role == Role::kQBias || role == Role::kKBias)) {
      e.permute_heads = (role == Role::kQ || role == Role::kQBias) ? m.config.num_heads : m.config.num_kv_heads;
      const int64_t rows = t.ne.size() == 1 ? static_cast<int64_t>(t.ne[0]) : t.rows();
      if (rows % (2 * e.permute_heads) != 0) {
        return absl::DataLossError(absl::StrCat(path, ": tensor \"", t.name, "\" has ", rows, " rows, not a multiple of 2 x ",
                                                e.permute_heads, " heads"));
      }
    }
    source->Add(std::move(e));
  }
  m.tensors = std::move(source);
  return m;
}

}  // namespace ferry::engine
