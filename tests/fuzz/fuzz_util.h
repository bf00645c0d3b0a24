// Helpers of the fuzz targets: a private directory per process for inputs that must be files.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <string>

#include "base/file.h"

namespace ferry::fuzz {

inline const std::string& ScratchDir() {
  static const std::string dir = [] {
    std::string tmpl = "/tmp/ferry-fuzz-XXXXXX";
    return std::string(mkdtemp(tmpl.data()));
  }();
  return dir;
}

inline void Write(const std::string& path, const uint8_t* data, size_t size) {
  (void)WriteFileAtomically(path, std::string(reinterpret_cast<const char*>(data), size));
}

}  // namespace ferry::fuzz
