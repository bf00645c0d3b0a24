// POSIX file helpers: an owning fd and read loops that handle short reads and EINTR, returning
// kNotFound for a missing file and kDataLoss when the file ends early.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace ferry {

class ScopedFd {
 public:
  ScopedFd() = default;
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd();
  ScopedFd(ScopedFd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  ScopedFd& operator=(ScopedFd&& o) noexcept;
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;

  static absl::StatusOr<ScopedFd> OpenForRead(const std::string& path);
  int get() const { return fd_; }

 private:
  int fd_ = -1;
};

absl::StatusOr<uint64_t> FileSize(int fd, const std::string& path_for_errors);
// Reads exactly `n` bytes at `offset`; a file that ends first is kDataLoss.
absl::Status PreadFull(int fd, void* dst, size_t n, uint64_t offset, const std::string& path_for_errors);
// pwrite until all n bytes are written (EINTR retried).
absl::Status PwriteFull(int fd, const void* src, size_t n, uint64_t offset, const std::string& path_for_errors);
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes path.tmp, fsyncs it and renames it over path: a crash leaves the old file or the new one.
absl::Status WriteFileAtomically(const std::string& path, const std::string& data);
bool PathExists(const std::string& path);
// Creates the directory and any missing parents (as mkdir -p); an existing directory is fine.
absl::Status MakeDirs(const std::string& path);

}  // namespace ferry
