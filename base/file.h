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
  // Gives up ownership: the caller closes the descriptor.
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

absl::StatusOr<uint64_t> FileSize(int fd, const std::string& path_for_errors);

// An output that only ever holds whole records: opened for appending under an exclusive lock (a
// second job on the same file is refused), each Append is written completely or, on any error
// (a full disk, a file size limit), cut back to where it began, so the file stays a sequence of
// complete records that a resumed job accepts; Close syncs and reports errors. A path that is the
// input (the same file, through links too) is refused. "-" is standard output (no lock, no cut).
class RecordFile {
 public:
  // `must_differ`: a file this one must not be (the job's input); empty: none.
  static absl::StatusOr<RecordFile> Open(const std::string& path, const std::string& must_differ = "");
  RecordFile(RecordFile&&) noexcept = default;
  RecordFile& operator=(RecordFile&&) noexcept = default;
  ~RecordFile();

  absl::StatusOr<uint64_t> Size() const;
  absl::Status Truncate(uint64_t size);
  absl::Status Append(const std::string& data);
  absl::Status Close();
  const std::string& path() const { return path_; }

 private:
  RecordFile() = default;
  std::string path_;
  ScopedFd fd_;
  bool is_stdout_ = false, closed_ = false;
};

// Refuses what is not a regular file (a FIFO would block open forever, a directory cannot be read).
absl::Status RequireRegularFile(const std::string& path);
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
