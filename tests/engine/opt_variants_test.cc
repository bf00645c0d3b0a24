// OPT layouts tiny-opt does not exercise (post-LN as opt-350m, project_in/project_out, explicit
// lm_head, no final LayerNorm, the "decoder." prefix), each on random weights against a
// straightforward double-precision forward written here from the transformers model code.
#include <cmath>

#include "engine/model.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "test_util.h"

namespace ferry::engine {
namespace {

using ferry::testing::MakeTensor;
using ferry::testing::RandomValues;
using Vec = std::vector<double>;
using Weights = std::map<std::string, std::vector<float>>;

struct Variant {
  bool pre_ln;
  int proj_dim;  // == hidden: no projection
  bool tied;
  bool remove_final_ln;
  std::string prefix;
};

constexpr int kD = 16, kF = 40, kH = 2, kL = 2, kV = 50, kP = 12;

// y[o] = sum_j W[o, j] x[j] (+ b[o])
Vec Lin(const std::vector<float>& w, const std::vector<float>* b, const Vec& x, int out) {
  const int in = static_cast<int>(x.size());
  Vec y(out);
  for (int o = 0; o < out; ++o) {
    double s = b ? (*b)[o] : 0.0;
    for (int j = 0; j < in; ++j) s += w[o * in + j] * x[j];
    y[o] = s;
  }
  return y;
}

Vec Ln(const Vec& x, const std::vector<float>& g, const std::vector<float>& b) {
  double mean = 0, var = 0;
  for (double v : x) mean += v;
  mean /= x.size();
  for (double v : x) var += (v - mean) * (v - mean);
  var /= x.size();
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = (x[i] - mean) / std::sqrt(var + 1e-5) * g[i] + b[i];
  return y;
}

// Logits at every position of one sequence.
std::vector<Vec> Reference(const Variant& v, Weights& W, const std::vector<int>& ids) {
  const std::string p = v.prefix;
  const int n = static_cast<int>(ids.size()), hd = kD / kH;
  std::vector<Vec> h(n);
  for (int t = 0; t < n; ++t) {
    Vec e(W[p + "embed_tokens.weight"].begin() + ids[t] * v.proj_dim,
          W[p + "embed_tokens.weight"].begin() + (ids[t] + 1) * v.proj_dim);
    if (v.proj_dim != kD) e = Lin(W[p + "project_in.weight"], nullptr, e, kD);
    for (int j = 0; j < kD; ++j) e[j] += W[p + "embed_positions.weight"][(t + 2) * kD + j];
    h[t] = e;
  }
  for (int l = 0; l < kL; ++l) {
    const std::string q = p + "layers." + std::to_string(l) + ".";
    auto lin = [&](const std::string& name, const Vec& x, int out) {
      return Lin(W[q + name + ".weight"], &W[q + name + ".bias"], x, out);
    };
    std::vector<Vec> a(n), K(n), V(n), Q(n);
    for (int t = 0; t < n; ++t) {
      a[t] = v.pre_ln ? Ln(h[t], W[q + "self_attn_layer_norm.weight"], W[q + "self_attn_layer_norm.bias"]) : h[t];
      Q[t] = lin("self_attn.q_proj", a[t], kD);
      K[t] = lin("self_attn.k_proj", a[t], kD);
      V[t] = lin("self_attn.v_proj", a[t], kD);
    }
    for (int t = 0; t < n; ++t) {
      Vec att(kD, 0.0);
      for (int hh = 0; hh < kH; ++hh) {
        Vec s(t + 1);
        double mx = -1e300, sum = 0;
        for (int j = 0; j <= t; ++j) {
          double dot = 0;
          for (int d = 0; d < hd; ++d) dot += Q[t][hh * hd + d] * K[j][hh * hd + d];
          s[j] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int j = 0; j <= t; ++j)
          for (int d = 0; d < hd; ++d) att[hh * hd + d] += s[j] / sum * V[j][hh * hd + d];
      }
      Vec o = lin("self_attn.out_proj", att, kD);
      for (int j = 0; j < kD; ++j) h[t][j] += o[j];
      if (!v.pre_ln) h[t] = Ln(h[t], W[q + "self_attn_layer_norm.weight"], W[q + "self_attn_layer_norm.bias"]);
      Vec f = v.pre_ln ? Ln(h[t], W[q + "final_layer_norm.weight"], W[q + "final_layer_norm.bias"]) : h[t];
      f = lin("fc1", f, kF);
      for (auto& x : f) x = std::max(0.0, x);
      f = lin("fc2", f, kD);
      for (int j = 0; j < kD; ++j) h[t][j] += f[j];
      if (!v.pre_ln) h[t] = Ln(h[t], W[q + "final_layer_norm.weight"], W[q + "final_layer_norm.bias"]);
    }
  }
  std::vector<Vec> logits(n);
  for (int t = 0; t < n; ++t) {
    Vec x = h[t];
    if (v.pre_ln && !v.remove_final_ln) x = Ln(x, W[p + "final_layer_norm.weight"], W[p + "final_layer_norm.bias"]);
    if (v.proj_dim != kD) x = Lin(W[p + "project_out.weight"], nullptr, x, v.proj_dim);
    logits[t] = Lin(v.tied ? W[p + "embed_tokens.weight"] : W["lm_head.weight"], nullptr, x, kV);
  }
  return logits;
}

class OptVariantTest : public ::testing::TestWithParam<Variant> {};

TEST_P(OptVariantTest, MatchesDoubleReference) {
  const Variant v = GetParam();
  const std::string p = v.prefix;
  Weights W;
  std::vector<ferry::testing::StTensor> tensors;
  uint32_t seed = 100;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float scale, float offset = 0.0f) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> vals = RandomValues(n, seed++, scale);
    for (auto& x : vals) x += offset;
    W[name] = vals;
    tensors.push_back(MakeTensor(name, DType::kF32, shape, vals));
  };
  add(p + "embed_tokens.weight", {kV, v.proj_dim}, 0.5f);
  add(p + "embed_positions.weight", {kP + 2, kD}, 0.5f);
  if (v.proj_dim != kD) {
    add(p + "project_in.weight", {kD, v.proj_dim}, 0.5f);
    add(p + "project_out.weight", {v.proj_dim, kD}, 0.5f);
  }
  if (v.pre_ln && !v.remove_final_ln) {
    add(p + "final_layer_norm.weight", {kD}, 0.2f, 1.0f);
    add(p + "final_layer_norm.bias", {kD}, 0.2f);
  }
  if (!v.tied) add("lm_head.weight", {kV, v.proj_dim}, 0.5f);
  for (int l = 0; l < kL; ++l) {
    const std::string q = p + "layers." + std::to_string(l) + ".";
    for (const char* ln : {"self_attn_layer_norm", "final_layer_norm"}) {
      add(q + ln + ".weight", {kD}, 0.2f, 1.0f);
      add(q + ln + ".bias", {kD}, 0.2f);
    }
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      add(q + "self_attn." + proj + ".weight", {kD, kD}, 0.4f);
      add(q + "self_attn." + proj + ".bias", {kD}, 0.2f);
    }
    add(q + "fc1.weight", {kF, kD}, 0.4f);
    add(q + "fc1.bias", {kF}, 0.2f);
    add(q + "fc2.weight", {kD, kF}, 0.3f);
    add(q + "fc2.bias", {kD}, 0.2f);
  }
  ferry::testing::TempDir dir;
  ferry::testing::WriteFile(dir.File("model.safetensors"), ferry::testing::SerializeSafetensors(tensors));
  nlohmann::json cfg = {{"model_type", "opt"}, {"hidden_size", kD}, {"ffn_dim", kF}, {"num_attention_heads", kH},
                        {"num_hidden_layers", kL}, {"vocab_size", kV}, {"max_position_embeddings", kP},
                        {"do_layer_norm_before", v.pre_ln}, {"word_embed_proj_dim", v.proj_dim},
                        {"tie_word_embeddings", v.tied}, {"_remove_final_layer_norm", v.remove_final_ln},
                        {"activation_function", "relu"}};
  ferry::testing::WriteFile(dir.File("config.json"), cfg.dump());

  kernels::CpuBackend cpu;
  auto model = Model::Load(dir.path(), &cpu);
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<int> ids = {2, 17, 5, 49, 0, 33, 8};
  auto cache = offload::CreateKvCache(cpu, KvSpec((*model)->config(), 1, kP));
  ASSERT_TRUE(cache.ok());
  // Prefill the first 4 tokens, then decode the rest one at a time.
  std::vector<float> got;
  std::vector<std::vector<float>> rows;
  ForwardBatch pre;
  for (int t = 0; t < 4; ++t) {
    pre.tokens.push_back(ids[t]), pre.seq_ids.push_back(0), pre.positions.push_back(t), pre.logit_rows.push_back(t);
  }
  ASSERT_TRUE((*model)->Forward(pre, **cache, &got).ok());
  for (int t = 0; t < 4; ++t) rows.emplace_back(got.begin() + t * kV, got.begin() + (t + 1) * kV);
  for (int t = 4; t < static_cast<int>(ids.size()); ++t) {
    ForwardBatch step{{ids[t]}, {0}, {t}, {0}};
    ASSERT_TRUE((*model)->Forward(step, **cache, &got).ok());
    rows.push_back(got);
  }
  const auto ref = Reference(v, W, ids);
  for (size_t t = 0; t < ids.size(); ++t) {
    double diff = 0, mag = 0;
    for (int j = 0; j < kV; ++j) {
      diff = std::max(diff, std::abs(rows[t][j] - ref[t][j]));
      mag = std::max(mag, std::abs(ref[t][j]));
    }
    EXPECT_LT(diff / mag, 1e-5) << "position " << t;
  }
  // A position past max_position_embeddings is refused.
  ForwardBatch past{{1}, {0}, {kP}, {0}};
  EXPECT_EQ((*model)->Forward(past, **cache, &got).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Layouts, OptVariantTest,
                         ::testing::Values(Variant{true, kD, true, false, "model.decoder."},
                                           Variant{false, 8, false, false, "model.decoder."},
                                           Variant{true, 24, true, true, "decoder."}));

TEST(OptModelLoadTest, MissingTensorAndWrongShapeAreClearErrors) {
  ferry::testing::TempDir dir;
  nlohmann::json cfg = {{"model_type", "opt"}, {"hidden_size", kD}, {"ffn_dim", kF}, {"num_attention_heads", kH},
                        {"num_hidden_layers", kL}, {"vocab_size", kV}, {"max_position_embeddings", kP}};
  ferry::testing::WriteFile(dir.File("config.json"), cfg.dump());
  ferry::testing::WriteFile(dir.File("model.safetensors"),
                            ferry::testing::SerializeSafetensors({MakeTensor("model.decoder.embed_tokens.weight", DType::kF32,
                                                                             {kV, kD + 1}, RandomValues(kV * (kD + 1), 1))}));
  kernels::CpuBackend cpu;
  auto m = Model::Load(dir.path(), &cpu);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("embed_tokens"), std::string::npos) << m.status();
  ferry::testing::WriteFile(dir.File("model.safetensors"),
                            ferry::testing::SerializeSafetensors({MakeTensor("model.decoder.embed_tokens.weight", DType::kF32,
                                                                             {kV, kD}, RandomValues(kV * kD, 1))}));
  m = Model::Load(dir.path(), &cpu);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("embed_positions"), std::string::npos) << m.status();
  ferry::testing::WriteFile(dir.File("config.json"), "{\"model_type\": \"gpt2\"}");
  EXPECT_EQ(Model::Load(dir.path(), &cpu).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::engine
