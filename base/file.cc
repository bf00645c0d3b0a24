#include "base/file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry {

ScopedFd::~ScopedFd() {
  if (fd_ >= 0) ::close(fd_);
}

ScopedFd& ScopedFd::operator=(ScopedFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

absl::Status RequireRegularFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(errno, absl::StrCat("stat ", path));
  }
  if (S_ISDIR(st.st_mode)) return absl::InvalidArgumentError(absl::StrCat(path, " is a directory, not a file"));
  if (!S_ISREG(st.st_mode)) return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  return absl::OkStatus();
}

absl::StatusOr<ScopedFd> ScopedFd::OpenForRead(const std::string& path) {
  FERRY_RETURN_IF_ERROR(RequireRegularFile(path));
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(err, absl::StrCat("open ", path));
  }
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is a directory, not a file"));
  }
  return ScopedFd(fd);
}

absl::StatusOr<uint64_t> FileSize(int fd, const std::string& path_for_errors) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("stat ", path_for_errors));
  return static_cast<uint64_t>(st.st_size);
}

absl::Status PreadFull(int fd, void* dst, size_t n, uint64_t offset, const std::string& path_for_errors) {
  char* out = static_cast<char*>(dst);
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("read ", path_for_errors, " at offset ", offset + done));
    }
    if (r == 0) {
      return absl::DataLossError(absl::StrCat(path_for_errors, ": file ends at byte ", offset + done,
                                              " but ", offset + n, " bytes were expected"));
    }
    done += static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::Status PwriteFull(int fd, const void* src, size_t n, uint64_t offset, const std::string& path_for_errors) {
  const char* p = static_cast<const char*>(src);
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::pwrite(fd, p + done, n - done, static_cast<off_t>(offset + done));
    if (w < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("write ", path_for_errors));
    }
    done += static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& data) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("create ", tmp));
  ScopedFd guard(fd);
  absl::Status st = PwriteFull(fd, data.data(), data.size(), 0, tmp);
  if (st.ok() && ::fsync(fd) != 0) st = absl::ErrnoToStatus(errno, absl::StrCat("fsync ", tmp));
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) st = absl::ErrnoToStatus(errno, absl::StrCat("rename ", tmp));
  if (!st.ok()) ::unlink(tmp.c_str());  // no half-written leftover
  return st;
}

absl::StatusOr<RecordFile> RecordFile::Open(const std::string& path, const std::string& must_differ) {
  RecordFile f;
  f.path_ = path;
  if (path.empty() || path == "-") {
    f.is_stdout_ = true;
    return f;
  }
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return absl::InvalidArgumentError(absl::StrCat(path, " is a directory, not a file"));
    if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
    struct stat in;
    if (!must_differ.empty() && ::stat(must_differ.c_str(), &in) == 0 && in.st_dev == st.st_dev && in.st_ino == st.st_ino) {
      return absl::InvalidArgumentError(absl::StrCat(path, " is the input ", must_differ, "; writing it would destroy the input"));
    }
  }
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", path));
  f.fd_ = ScopedFd(fd);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return absl::FailedPreconditionError(absl::StrCat(path, " is being written by another ferry job (it holds the lock)"));
    }
    return absl::ErrnoToStatus(errno, absl::StrCat("lock ", path));
  }
  return f;
}

RecordFile::~RecordFile() {
  if (!closed_ && fd_.get() >= 0) ::fsync(fd_.get());
}

absl::StatusOr<uint64_t> RecordFile::Size() const {
  if (is_stdout_) return 0;
  return FileSize(fd_.get(), path_);
}

absl::Status RecordFile::Truncate(uint64_t size) {
  struct stat st;
  if (is_stdout_ || (::fstat(fd_.get(), &st) == 0 && !S_ISREG(st.st_mode))) return absl::OkStatus();  // a device: nothing to cut
  if (::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("truncate ", path_));
  return absl::OkStatus();
}

absl::Status RecordFile::Append(const std::string& data) {
  const int fd = is_stdout_ ? STDOUT_FILENO : fd_.get();
  uint64_t before = 0;
  struct stat st;
  const bool regular = !is_stdout_ && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  if (regular) before = static_cast<uint64_t>(st.st_size);
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : ENOSPC;
      // Cut back to the last whole record, so that --resume continues from there.
      if (regular) (void)::ftruncate(fd, static_cast<off_t>(before));
      return absl::ErrnoToStatus(err, absl::StrCat("writing ", is_stdout_ ? std::string("standard output") : path_,
                                                   regular ? " (the file ends at the last complete record: --resume continues it)" : ""));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status RecordFile::Close() {
  closed_ = true;
  if (is_stdout_) return absl::OkStatus();
  struct stat st;
  const bool regular = ::fstat(fd_.get(), &st) == 0 && S_ISREG(st.st_mode);
  if (regular && ::fsync(fd_.get()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("fsync ", path_));
  if (::close(fd_.release()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("close ", path_));
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  FERRY_ASSIGN_OR_RETURN(ScopedFd fd, ScopedFd::OpenForRead(path));
  FERRY_ASSIGN_OR_RETURN(uint64_t size, FileSize(fd.get(), path));
  std::string data(size, '\0');
  FERRY_RETURN_IF_ERROR(PreadFull(fd.get(), data.data(), size, 0, path));
  return data;
}

bool PathExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

absl::Status MakeDirs(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("empty directory path");
  for (size_t pos = path.find('/', 1);; pos = path.find('/', pos + 1)) {
    const std::string part = pos == std::string::npos ? path : path.substr(0, pos);
    if (!part.empty() && ::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::ErrnoToStatus(errno, absl::StrCat("mkdir ", part));
    }
    if (pos == std::string::npos) break;
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " exists and is not a directory"));
  }
  return absl::OkStatus();
}

}  // namespace ferry
