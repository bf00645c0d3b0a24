// Running the `ferry` binary from tests: its exit code, stdout and stderr.
#pragma once

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "base/file.h"
#include "test_util.h"

namespace ferry::testing {

struct Result {
  int code;
  std::string out, err;
};

// $FERRY_BINARY when set, else the binary of this build.
inline std::string FerryBinary() {
  const char* env = std::getenv("FERRY_BINARY");
  return env != nullptr ? env : FERRY_BINARY;
}

inline Result Ferry(const std::string& args) {
  TempDir dir;
  const std::string cmd = FerryBinary() + " " + args + " >" + dir.File("out") + " 2>" + dir.File("err");
  const int status = std::system(cmd.c_str());
  Result r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, "", ""};
  r.out = ReadFileToString(dir.File("out")).value_or("");
  r.err = ReadFileToString(dir.File("err")).value_or("");
  return r;
}

inline int Lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

inline const std::string kModel = "--model " + ModelDir();

}  // namespace ferry::testing
