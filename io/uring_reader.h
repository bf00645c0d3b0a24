// Reads file ranges with io_uring: requests of at most block_bytes, up to queue_depth in flight,
// O_DIRECT (no page cache) when the file was opened so, READ_FIXED into registered buffers.
// Short reads continue where they stopped, -EAGAIN and -EINTR are resubmitted, end of file is
// kDataLoss and other errors (-EIO, ...) are returned as a Status naming file and offset. A
// failing read drains its in-flight requests before it returns, so no request outlives the call.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/file.h"

struct io_uring;

namespace ferry::io {

inline constexpr size_t kDirectAlignment = 4096;

struct UringOptions {
  unsigned queue_depth = 16;
  size_t block_bytes = 1 << 20;
  // Buffers to register for READ_FIXED (e.g. the pinned staging buffers); reads into other memory
  // use plain READ.
  std::vector<iovec> registered;
  // Test hook: rewrites a completion's result (bytes read or -errno) before it is handled, to
  // inject short reads and errors into real I/O.
  std::function<int(int result, size_t requested)> fault_hook;
};

// A file opened for reading, with O_DIRECT where the file system supports it.
struct ReadFile {
  ScopedFd fd;
  std::string path;
  bool direct = false;
  uint64_t size = 0;
  static absl::StatusOr<ReadFile> Open(const std::string& path, bool want_direct);
};

class UringReader {
 public:
  static absl::StatusOr<std::unique_ptr<UringReader>> Create(const UringOptions& options);
  ~UringReader();
  UringReader(const UringReader&) = delete;
  UringReader& operator=(const UringReader&) = delete;

  // Reads bytes [offset, offset + n) of `file` into dst. With O_DIRECT, offset, n and dst must be
  // 4 KiB-aligned (kInvalidArgument otherwise). Not thread-safe: one reader per thread.
  absl::Status Read(const ReadFile& file, uint64_t offset, void* dst, size_t n);
  // Reads several extents with one pipeline (queue_depth requests in flight across them), e.g.
  // the scattered pages of a sparse fetch. The same rules per extent.
  struct ReadExtent {
    uint64_t offset;
    void* dst;
    size_t n;
  };
  absl::Status ReadMany(const ReadFile& file, const std::vector<ReadExtent>& extents);

  // Counters since creation.
  uint64_t requests() const { return requests_; }
  uint64_t resubmits() const { return resubmits_; }

 private:
  UringReader() = default;
  int RegisteredIndex(const void* dst, size_t n) const;

  std::unique_ptr<io_uring> ring_;
  UringOptions options_;
  uint64_t requests_ = 0, resubmits_ = 0;
};

}  // namespace ferry::io
