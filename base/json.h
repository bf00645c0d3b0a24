// JSON from files and lines ferry did not write: parsed without exceptions, refused (one line,
// kInvalidArgument naming `what`) when malformed or nested deeper than max_depth levels (a value
// nested 100,000 levels deep would exhaust the stack when it is copied or freed).
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace ferry {

// The deepest nesting of arrays and objects in `text` (brackets inside strings do not count).
int JsonDepth(std::string_view text);

absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, const std::string& what, int max_depth = 64);

}  // namespace ferry
