#include "base/json.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace ferry {

int JsonDepth(std::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, const std::string& what, int max_depth) {
  if (JsonDepth(text) > max_depth) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": JSON nested deeper than ", max_depth, " levels"));
  }
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(what, ": malformed JSON"));
  return j;
}

}  // namespace ferry
