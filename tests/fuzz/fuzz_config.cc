// config.json of every family, then the roles and KV spec a parsed config implies.
#include <cstdint>
#include <string>

#include "engine/family.h"
#include "engine/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto c = ferry::engine::ModelConfig::FromJson(text, "config.json");
  if (!c.ok()) return 0;
  (void)ferry::engine::GlobalRoles(*c);
  (void)ferry::engine::LayerRoles(*c);
  (void)ferry::offload::KvCacheBytes(ferry::engine::KvSpec(*c, 2, 64));
  (void)ferry::engine::Model::ForwardWorkspaceBytes(*c, 64, 2, 16);
  return 0;
}
