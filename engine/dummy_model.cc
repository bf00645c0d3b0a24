#include "engine/dummy_model.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/dtype.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "io/store.h"
#include "nlohmann/json.hpp"

namespace ferry::engine {
namespace {

constexpr int kVocab = 50272, kPositions = 2048;

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::vector<io::PlannedTensor> Tensors(const DummyShape& s) {
  const int64_t d = s.hidden, f = s.ffn;
  std::vector<io::PlannedTensor> t = {{"model.decoder.embed_tokens.weight", DType::kF16, {kVocab, d}},
                                      {"model.decoder.embed_positions.weight", DType::kF16, {kPositions + 2, d}},
                                      {"model.decoder.final_layer_norm.weight", DType::kF16, {d}},
                                      {"model.decoder.final_layer_norm.bias", DType::kF16, {d}}};
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = absl::StrCat("model.decoder.layers.", l, ".");
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      t.push_back({p + "self_attn." + proj + ".weight", DType::kF16, {d, d}});
      t.push_back({p + "self_attn." + proj + ".bias", DType::kF16, {d}});
    }
    for (const char* ln : {"self_attn_layer_norm", "final_layer_norm"}) {
      t.push_back({p + ln + ".weight", DType::kF16, {d}});
      t.push_back({p + ln + ".bias", DType::kF16, {d}});
    }
    t.push_back({p + "fc1.weight", DType::kF16, {f, d}});
    t.push_back({p + "fc1.bias", DType::kF16, {f}});
    t.push_back({p + "fc2.weight", DType::kF16, {d, f}});
    t.push_back({p + "fc2.bias", DType::kF16, {d}});
  }
  return t;
}

}  // namespace

const std::vector<DummyShape>& DummyShapes() {
  static const std::vector<DummyShape> shapes = {
      {"opt-125m", 12, 768, 12, 3072},     {"opt-1.3b", 24, 2048, 32, 8192},   {"opt-6.7b", 32, 4096, 32, 16384},
      {"opt-13b", 40, 5120, 40, 20480},    {"opt-30b", 48, 7168, 56, 28672},   {"opt-66b", 64, 9216, 72, 36864},
      {"opt-175b", 96, 12288, 96, 49152}};
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
  nlohmann::json j = {{"model_type", "opt"}, {"hidden_size", s.hidden}, {"ffn_dim", s.ffn},
                      {"num_attention_heads", s.heads}, {"num_hidden_layers", s.layers}, {"vocab_size", kVocab},
                      {"max_position_embeddings", kPositions}, {"do_layer_norm_before", true},
                      {"word_embed_proj_dim", s.hidden}, {"activation_function", "relu"}, {"enable_bias", true},
                      {"tie_word_embeddings", true}, {"bos_token_id", 2}, {"eos_token_id", 2}, {"pad_token_id", 1},
                      {"torch_dtype", "float16"}, {"_ferry_dummy", s.name}};
  return j.dump(1);
}

uint64_t DummyWeightBytes(const DummyShape& s) {
  uint64_t total = 0;
  for (const auto& t : Tensors(s)) {
    uint64_t n = 2;
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    total += n;
  }
  return total;
}

absl::Status WriteDummyStore(const DummyShape& shape, const std::string& out_dir, const DummyStoreOptions& options) {
  FERRY_ASSIGN_OR_RETURN(io::StoreWriter writer, io::StoreWriter::Create(out_dir, Tensors(shape)));
  constexpr int64_t kPiece = int64_t{64} << 20;  // elements generated per write
  constexpr int64_t kChunk = int64_t{1} << 16;   // elements per parallel task
  std::vector<uint16_t> buf;
  uint64_t done = 0;
  const uint16_t one = F32ToF16(1.0f), zero = F32ToF16(0.0f);
  for (size_t i = 0; i < writer.order().size(); ++i) {
    const io::PlannedTensor& t = writer.order()[i];
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    const bool ln_weight = t.name.find("layer_norm.weight") != std::string::npos;
    const bool ln_bias = t.name.find("layer_norm.bias") != std::string::npos;
    for (int64_t p0 = 0; p0 < numel; p0 += kPiece) {
      const int64_t n = std::min(kPiece, numel - p0);
      buf.resize(static_cast<size_t>(n));
      ThreadPool::Default().ParallelFor((n + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          uint64_t state = Mix(options.seed ^ Mix(i * 0x100000001b3ull + static_cast<uint64_t>(p0 / kChunk + c)));
          for (int64_t k = c * kChunk; k < std::min(n, (c + 1) * kChunk); ++k) {
            if (ln_weight || ln_bias) {
              buf[k] = ln_weight ? one : zero;
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
