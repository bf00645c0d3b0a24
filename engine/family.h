// A model family: data plus a little math, not a copy of the model. A family maps its
// config.json onto ModelConfig (refusing, by name, every field it cannot run) and tensor roles onto
// checkpoint names (a table, as llama.cpp's architecture tables do). The registry finds the
// family of a model_type. Adding a family is one file in engine/families/ and a registry line.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "io/tensor_source.h"
#include "nlohmann/json.hpp"
#include "offload/weights.h"

namespace ferry::engine {

// One entry of a family's name table: the checkpoint name of a role, relative to the family's
// prefix ("{L}" stands for the layer index) unless `absolute`.
struct RoleName {
  offload::Role role;
  const char* name;
  bool absolute = false;
};

// A llama.cpp architecture (general.architecture of a GGUF file) this family runs.
struct GgufArch {
  const char* arch;
  const char* model_type;  // the config.json model_type it stands for
  bool qk_permuted;        // llama.cpp's converter permuted the Q and K rows (interleaved rope pairs)
};

struct Family {
  const char* name;
  std::vector<std::string> model_types;
  // Candidate name prefixes, the first whose token embedding exists in a checkpoint wins.
  std::vector<std::string> prefixes;
  std::vector<RoleName> names;
  absl::StatusOr<ModelConfig> (*parse)(const nlohmann::json& config, const std::string& source);
  std::vector<GgufArch> gguf = {};
};

// The family of `model_type`, or kInvalidArgument naming the supported ones.
absl::StatusOr<const Family*> FindFamily(const std::string& model_type, const std::string& source);
const std::vector<const Family*>& Families();

// The families (registry.cc lists them).
const Family& OptFamily();
const Family& LlamaFamily();

// What a role is in a given model: its shape and whether it is a matrix (kept in the checkpoint's
// dtype; streamed when offloaded) or a vector (read as fp32, always resident).
struct RoleSpec {
  offload::Role role;
  std::vector<int64_t> shape;
  bool matrix = false;
};
// The model-wide and per-layer tensors `c` needs, in load order.
std::vector<RoleSpec> GlobalRoles(const ModelConfig& c);
std::vector<RoleSpec> LayerRoles(const ModelConfig& c);

// A family's names resolved for one checkpoint (its prefix chosen).
class TensorNames {
 public:
  static absl::StatusOr<TensorNames> Resolve(const Family& family, const io::TensorSource& source);
  static TensorNames WithPrefix(const Family& family, const std::string& prefix);
  // "" when the family has no name for the role.
  std::string Global(offload::Role role) const;
  std::string Layer(offload::Role role, int layer) const;
  // The role of a checkpoint name (and its layer, -1 for model-wide ones); false when none.
  bool RoleOf(const std::string& name, offload::Role* role, int* layer) const;

 private:
  const Family* family_ = nullptr;
  std::string prefix_;
};

// Helpers for the families' config parsers: each returns a one-line kInvalidArgument naming the
// field and the file.
namespace config_fields {
absl::Status Refuse(const std::string& source, const std::string& field, const std::string& why);
absl::StatusOr<int> PositiveInt(const nlohmann::json& j, const std::string& source, const char* field);
absl::StatusOr<int> OptionalPositiveInt(const nlohmann::json& j, const std::string& source, const char* field, int fallback);
absl::StatusOr<bool> OptionalBool(const nlohmann::json& j, const std::string& source, const char* field, bool fallback);
absl::StatusOr<double> OptionalNumber(const nlohmann::json& j, const std::string& source, const char* field, double fallback);
// A token id or a list of them (eos_token_id in Llama 3); -1 when absent or null.
absl::StatusOr<std::vector<int>> TokenIds(const nlohmann::json& j, const std::string& source, const char* field);
// Refuses any key of `j` that is neither understood nor known to be irrelevant to inference.
absl::Status RefuseUnknownKeys(const nlohmann::json& j, const std::string& source, const std::vector<std::string>& understood);
// Checks the token ids against the vocabulary.
absl::Status CheckTokenIds(const ModelConfig& c, const std::string& source);
}  // namespace config_fields

}  // namespace ferry::engine
