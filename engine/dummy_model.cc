#include "engine/dummy_model.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "base/dtype.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "engine/family.h"
#include "io/store.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

using offload::Role;

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct DummyTensor {
  io::PlannedTensor planned;
  bool norm = false, bias = false;  // norms are ones, biases zeros
  bool layer_matrix = false;
};

absl::StatusOr<std::vector<DummyTensor>> Tensors(const DummyShape& s) {
  FERRY_ASSIGN_OR_RETURN(const ModelConfig c, ModelConfig::FromJson(DummyConfigJson(s), s.name));
  FERRY_ASSIGN_OR_RETURN(const Family* family, FindFamily(c.model_type, s.name));
  const TensorNames names = TensorNames::WithPrefix(*family, family->prefixes.front());
  auto is_norm = [](Role r) {
    return r == Role::kFinalNorm || r == Role::kAttnNorm || r == Role::kFfnNorm || r == Role::kQNorm || r == Role::kKNorm;
  };
  auto is_bias = [](Role r) {
    return r == Role::kFinalNormBias || r == Role::kAttnNormBias || r == Role::kFfnNormBias || r == Role::kQBias ||
           r == Role::kKBias || r == Role::kVBias || r == Role::kOBias || r == Role::kGateBias || r == Role::kUpBias ||
           r == Role::kDownBias;
  };
  std::vector<DummyTensor> t;
  for (const RoleSpec& r : GlobalRoles(c)) {
    t.push_back({{names.Global(r.role), DType::kF16, r.shape, offload::RoleName(r.role), std::nullopt}, is_norm(r.role), is_bias(r.role)});
  }
  const std::vector<RoleSpec> layer = LayerRoles(c);
  for (int l = 0; l < s.layers; ++l) {
    for (const RoleSpec& r : layer) {
      t.push_back({{names.Layer(r.role, l), DType::kF16, r.shape, offload::RoleName(r.role), std::nullopt}, is_norm(r.role),
                   is_bias(r.role), r.matrix});
    }
  }
  return t;
}

}  // namespace

const std::vector<DummyShape>& DummyShapes() {
  static const std::vector<DummyShape> shapes = {
      {"opt-125m", "opt", 12, 768, 12, 12, 3072, 50272, 2048},
      {"opt-1.3b", "opt", 24, 2048, 32, 32, 8192, 50272, 2048},
      {"opt-6.7b", "opt", 32, 4096, 32, 32, 16384, 50272, 2048},
      {"opt-13b", "opt", 40, 5120, 40, 40, 20480, 50272, 2048},
      {"opt-30b", "opt", 48, 7168, 56, 56, 28672, 50272, 2048},
      {"opt-66b", "opt", 64, 9216, 72, 72, 36864, 50272, 2048},
      {"opt-175b", "opt", 96, 12288, 96, 96, 49152, 50272, 2048},
      {"llama-2-7b", "llama", 32, 4096, 32, 32, 11008, 32000, 4096},
      {"llama-2-13b", "llama", 40, 5120, 40, 40, 13824, 32000, 4096},
      {"llama-2-70b", "llama", 80, 8192, 64, 8, 28672, 32000, 4096},
      {"llama-3-8b", "llama", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0},
      {"llama-3-70b", "llama", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0},
      {"qwen2.5-7b", "qwen2", 28, 3584, 28, 4, 18944, 152064, 32768, 1000000.0},
      {"qwen2.5-32b", "qwen2", 64, 5120, 40, 8, 27648, 152064, 32768, 1000000.0},
      {"mistral-7b", "mistral", 32, 4096, 32, 8, 14336, 32000, 32768, 1000000.0}};
  return shapes;
}

absl::StatusOr<DummyShape> FindDummyShape(const std::string& name) {
  std::string names;
  for (const auto& s : DummyShapes()) {
    if (s.name == name) return s;
    names += (names.empty() ? "" : ", ") + s.name;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dummy model \"", name, "\" (", names, ")"));
}

std::string DummyConfigJson(const DummyShape& s) {
  nlohmann::json j;
  if (s.model_type == "opt") {
    j = {{"model_type", "opt"}, {"hidden_size", s.hidden}, {"ffn_dim", s.ffn}, {"num_attention_heads", s.heads},
         {"num_hidden_layers", s.layers}, {"vocab_size", s.vocab}, {"max_position_embeddings", s.positions},
         {"do_layer_norm_before", true}, {"word_embed_proj_dim", s.hidden}, {"activation_function", "relu"},
         {"enable_bias", true}, {"tie_word_embeddings", true}, {"bos_token_id", 2}, {"eos_token_id", 2}, {"pad_token_id", 1}};
  } else {
    j = {{"model_type", s.model_type}, {"hidden_size", s.hidden}, {"intermediate_size", s.ffn},
         {"num_attention_heads", s.heads}, {"num_key_value_heads", s.kv_heads}, {"num_hidden_layers", s.layers},
         {"vocab_size", s.vocab}, {"max_position_embeddings", s.positions}, {"rope_theta", s.rope_theta},
         {"rms_norm_eps", 1e-5}, {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"bos_token_id", 1},
         {"eos_token_id", 2}};
    if (s.model_type == "mistral") j["sliding_window"] = nullptr;
  }
  j["torch_dtype"] = "float16";
  j["_ferry_dummy"] = s.name;
  return j.dump(1);
}

uint64_t DummyWeightBytes(const DummyShape& s) {
  auto tensors = Tensors(s);
  FERRY_CHECK(tensors.ok());  // the built-in shapes parse
  uint64_t total = 0;
  for (const auto& t : *tensors) {
    uint64_t n = 2;
    for (int64_t d : t.planned.shape) n *= static_cast<uint64_t>(d);
    total += n;
  }
  return total;
}

namespace {

io::PlannedTensor Planned(const DummyTensor& t, const std::optional<QuantFormat>& quantize) {
  io::PlannedTensor p = t.planned;
  if (quantize && t.layer_matrix) {
    p.dtype = DType::kU8;
    p.quant = quantize;
  }
  return p;
}

}  // namespace

absl::StatusOr<std::vector<io::PlannedTensor>> DummyPlannedTensors(const DummyShape& shape, const std::optional<QuantFormat>& quantize) {
  FERRY_ASSIGN_OR_RETURN(std::vector<DummyTensor> tensors, Tensors(shape));
  std::vector<io::PlannedTensor> planned;
  for (const auto& t : tensors) planned.push_back(Planned(t, quantize));
  return planned;
}

absl::Status WriteDummyStore(const DummyShape& shape, const std::string& out_dir, const DummyStoreOptions& options) {
  FERRY_ASSIGN_OR_RETURN(std::vector<DummyTensor> tensors, Tensors(shape));
  std::vector<io::PlannedTensor> planned;
  std::map<std::string, const DummyTensor*> by_name;
  for (const auto& t : tensors) {
    planned.push_back(Planned(t, options.quantize));
    by_name[t.planned.name] = &t;
  }
  FERRY_ASSIGN_OR_RETURN(io::StoreWriter writer, io::StoreWriter::Create(out_dir, std::move(planned)));
  constexpr int64_t kPiece = int64_t{64} << 20;  // elements generated per write
  constexpr int64_t kChunk = int64_t{1} << 16;   // elements per parallel task
  std::vector<uint16_t> buf;
  uint64_t done = 0;
  const uint16_t one = F32ToF16(1.0f), zero = F32ToF16(0.0f);
  for (size_t i = 0; i < writer.order().size(); ++i) {
    const io::PlannedTensor& t = writer.order()[i];
    const DummyTensor& kind = *by_name.at(t.name);
    if (t.quant) {
      // Random codes with fixed group parameters: values uniform in about [-0.03, 0.03) as below.
      FERRY_ASSIGN_OR_RETURN(const QuantLayout layout, LayoutQuantized(*t.quant, t.shape[0], t.shape[1]));
      std::vector<uint8_t> q(layout.bytes, 0);
      const uint64_t words = layout.values_bytes / 8;
      ThreadPool::Default().ParallelFor(static_cast<int64_t>((words + kChunk - 1) / kChunk), 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          uint64_t state = Mix(options.seed ^ Mix(i * 0x100000001b3ull + static_cast<uint64_t>(c)));
          for (uint64_t k = static_cast<uint64_t>(c) * kChunk; k < std::min<uint64_t>(words, (c + 1) * kChunk); ++k) {
            state = Mix(state);
            std::memcpy(q.data() + 8 * k, &state, 8);
          }
        }
      });
      const bool q4 = t.quant->kind == QuantKind::kQ4;
      const uint16_t scale = F32ToF16(q4 ? 0.06f / 15.0f : 0.03f / 127.0f), min = F32ToF16(-0.03f);
      const size_t params = static_cast<size_t>(t.shape[0]) * layout.groups_per_row;
      for (size_t g = 0; g < params; ++g) {
        std::memcpy(q.data() + layout.scales_offset + 2 * g, &scale, 2);
        if (q4) std::memcpy(q.data() + layout.mins_offset + 2 * g, &min, 2);
      }
      FERRY_RETURN_IF_ERROR(writer.Write(i, q.data(), q.size()));
      done += q.size();
      if (options.progress) options.progress(done, writer.total_bytes());
      continue;
    }
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    for (int64_t p0 = 0; p0 < numel; p0 += kPiece) {
      const int64_t n = std::min(kPiece, numel - p0);
      buf.resize(static_cast<size_t>(n));
      ThreadPool::Default().ParallelFor((n + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          uint64_t state = Mix(options.seed ^ Mix(i * 0x100000001b3ull + static_cast<uint64_t>(p0 / kChunk + c)));
          for (int64_t k = c * kChunk; k < std::min(n, (c + 1) * kChunk); ++k) {
            if (kind.norm || kind.bias) {
              buf[k] = kind.norm ? one : zero;
              continue;
            }
            state = Mix(state);
            // Uniform in [-0.03, 0.03): small enough that activations stay finite.
            const float u = static_cast<float>(state >> 40) * (1.0f / 16777216.0f);
            buf[k] = F32ToF16((u - 0.5f) * 0.06f);
          }
        }
      });
      FERRY_RETURN_IF_ERROR(writer.Write(i, buf.data(), static_cast<size_t>(n) * 2));
      done += static_cast<uint64_t>(n) * 2;
      if (options.progress) options.progress(done, writer.total_bytes());
    }
  }
  return writer.Finish({{"config.json", DummyConfigJson(shape)}});
}

}  // namespace ferry::engine
