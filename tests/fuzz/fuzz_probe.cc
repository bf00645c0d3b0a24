// A cached probe (ferry probe's JSON, read back from ~/.cache): a probe the cost model accepts must
// give finite, non-negative predictions for any policy (dense, H2O, Deja Vu), and one it refuses a
// status, never a crash.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "engine/cost_model.h"
#include "engine/dummy_model.h"
#include "engine/probe.h"
#include "io/store.h"
#include "kernels/registry.h"
#include "nlohmann/json.hpp"

namespace {

struct Fixture {
  ferry::engine::ModelConfig config;
  ferry::engine::WeightLayout layout;
  std::unique_ptr<ferry::kernels::Backend> backend;
};

const Fixture& Get() {
  static const Fixture f = [] {
    Fixture x;
    auto shape = ferry::engine::FindDummyShape("opt-125m");
    x.config = *ferry::engine::ModelConfig::FromJson(ferry::engine::DummyConfigJson(*shape), "opt-125m");
    x.layout = ferry::engine::LayoutOf(*ferry::io::LayoutStore(*ferry::engine::DummyPlannedTensors(*shape, std::nullopt)));
    x.backend = *ferry::kernels::CreateBackend({});
    return x;
  }();
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    (void)ferry::engine::ProbeTable(j);  // any field missing or mistyped: an exception, never a bad read
  } catch (const nlohmann::json::exception&) {
  }
  auto model = ferry::engine::CostModel::FromProbe(j);
  if (!model.ok()) return 0;
  const Fixture& f = Get();
  const ferry::offload::WeightSplit splits[] = {{100, 0, 0}, {0, 100, 0}, {0, 0, 100}, {20, 30, 50}};
  for (const auto& split : splits) {
    for (int kv_cpu = 0; kv_cpu < 3; ++kv_cpu) {
      ferry::engine::Policy p;
      p.split = split;
      p.gpu_batch_size = 8;
      p.num_gpu_batches = 2;
      p.kv_on_cpu = kv_cpu == 1;
      if (kv_cpu == 1) p.h2o = ferry::offload::H2OOptions{16, 16, 0};
      if (kv_cpu == 2) p.sparsity = 0.15, p.gpu_batch_size = 1;  // Deja Vu: the bundled-FFN points
      const ferry::engine::Workload w{64, 8, 100};
      auto plan = ferry::engine::Model::PlanOffload(f.layout, ferry::engine::PolicyOffload(f.config, p, w, 0, 0), *f.backend);
      if (!plan.ok()) std::abort();
      auto pred = model->Predict(f.config, f.layout, p, w, *plan);
      if (!pred.ok()) continue;  // e.g. a disk policy without disk rates
      for (double v : {pred->prefill_s, pred->step_s, pred->round_s, pred->throughput_tok_s}) {
        if (!std::isfinite(v) || v < 0) std::abort();
      }
    }
  }
  return 0;
}
