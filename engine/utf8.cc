// UTF-8 validation and repair (maximal-subpart replacement, as Python's errors="replace").
#include <string>
#include <string_view>

#include "engine/tokenizer.h"

namespace ferry::engine {
namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 with `consumed` = the maximal invalid subpart.
size_t ValidSequenceAt(std::string_view s, size_t i, size_t* consumed) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  int need;
  unsigned char lo = 0x80, hi = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) {
    need = 1;
  } else if (c == 0xe0) {
    need = 2, lo = 0xa0;
  } else if ((c >= 0xe1 && c <= 0xec) || c == 0xee || c == 0xef) {
    need = 2;
  } else if (c == 0xed) {
    need = 2, hi = 0x9f;
  } else if (c == 0xf0) {
    need = 3, lo = 0x90;
  } else if (c >= 0xf1 && c <= 0xf3) {
    need = 3;
  } else if (c == 0xf4) {
    need = 3, hi = 0x8f;
  } else {
    *consumed = 1;
    return 0;
  }
  size_t k = 1;
  for (; k <= static_cast<size_t>(need); ++k) {
    if (i + k >= s.size()) break;
    const unsigned char x = b(i + k);
    const unsigned char l = (k == 1) ? lo : 0x80, h = (k == 1) ? hi : 0xbf;
    if (x < l || x > h) break;
  }
  if (k == static_cast<size_t>(need) + 1) return k;
  *consumed = k;
  return 0;
}

}  // namespace

size_t FindInvalidUtf8(std::string_view bytes) {
  for (size_t i = 0; i < bytes.size();) {
    size_t consumed = 0;
    const size_t len = ValidSequenceAt(bytes, i, &consumed);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string SanitizeUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    size_t consumed = 0;
    const size_t len = ValidSequenceAt(bytes, i, &consumed);
    if (len > 0) {
      out.append(bytes.substr(i, len));
      i += len;
    } else {
      out.append("\xef\xbf\xbd");
      i += consumed;
    }
  }
  return out;
}

}  // namespace ferry::engine
