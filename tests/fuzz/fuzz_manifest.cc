// A store's manifest.json over a small weights.bin: a manifest that opens must allow verifying
// and reading every tensor without going out of bounds.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "io/store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = ferry::fuzz::ScratchDir();
  static const bool weights = [&] {
    std::string w(64 << 10, '\0');
    for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<char>(i * 131);
    return ferry::WriteFileAtomically(dir + "/weights.bin", w).ok();
  }();
  (void)weights;
  ferry::fuzz::Write(dir + "/manifest.json", data, size);
  auto store = ferry::io::Store::Open(dir);
  if (!store.ok()) return 0;
  (void)store->Verify();
  for (const std::string& name : store->Names()) {
    const ferry::io::TensorInfo* t = store->Find(name);
    if (t->bytes > (1u << 20)) continue;
    std::vector<char> buf(t->bytes);
    (void)store->Read(name, buf.data(), buf.size());
  }
  return 0;
}
