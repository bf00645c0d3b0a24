#include "io/uring_reader.h"

#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <deque>

#include "absl/strings/str_cat.h"
#include "base/status.h"

namespace ferry::io {
namespace {

constexpr int kMaxRetries = 1000;

struct Piece {
  uint64_t offset;
  char* dst;
  size_t len;
  int retries;
  int fixed;  // registered buffer index, or -1
};

}  // namespace

absl::StatusOr<ReadFile> ReadFile::Open(const std::string& path, bool want_direct) {
  ReadFile f;
  f.path = path;
  int fd = -1;
  if (want_direct) {
    do {
      fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    } while (fd < 0 && errno == EINTR);
    if (fd >= 0) f.direct = true;
    // EINVAL: the file system has no O_DIRECT (tmpfs); fall back to buffered reads below.
    if (fd < 0 && errno != EINVAL) {
      if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
      return absl::ErrnoToStatus(errno, absl::StrCat("open ", path));
    }
  }
  if (fd < 0) {
    FERRY_ASSIGN_OR_RETURN(ScopedFd plain, ScopedFd::OpenForRead(path));
    f.fd = std::move(plain);
  } else {
    f.fd = ScopedFd(fd);
  }
  FERRY_ASSIGN_OR_RETURN(f.size, FileSize(f.fd.get(), path));
  return f;
}

absl::StatusOr<std::unique_ptr<UringReader>> UringReader::Create(const UringOptions& options) {
  if (options.queue_depth == 0 || options.queue_depth > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("queue depth must be in [1, 4096], got ", options.queue_depth));
  }
  if (options.block_bytes == 0 || options.block_bytes % kDirectAlignment != 0) {
    return absl::InvalidArgumentError(absl::StrCat("block size must be a positive multiple of 4096, got ", options.block_bytes));
  }
  std::unique_ptr<UringReader> r(new UringReader());
  r->options_ = options;
  r->ring_ = std::make_unique<io_uring>();
  const int rc = io_uring_queue_init(options.queue_depth, r->ring_.get(), 0);
  if (rc < 0) {
    r->ring_.reset();
    return absl::ErrnoToStatus(-rc, "io_uring_queue_init");
  }
  if (!options.registered.empty()) {
    const int reg = io_uring_register_buffers(r->ring_.get(), options.registered.data(),
                                              static_cast<unsigned>(options.registered.size()));
    if (reg < 0) return absl::ErrnoToStatus(-reg, "io_uring_register_buffers (is RLIMIT_MEMLOCK too low?)");
  }
  return r;
}

UringReader::~UringReader() {
  if (ring_ != nullptr) io_uring_queue_exit(ring_.get());
}

int UringReader::RegisteredIndex(const void* dst, size_t n) const {
  const char* p = static_cast<const char*>(dst);
  for (size_t i = 0; i < options_.registered.size(); ++i) {
    const char* base = static_cast<const char*>(options_.registered[i].iov_base);
    if (p >= base && p + n <= base + options_.registered[i].iov_len) return static_cast<int>(i);
  }
  return -1;
}

absl::Status UringReader::Read(const ReadFile& file, uint64_t offset, void* dst, size_t n) {
  return ReadMany(file, {{offset, dst, n}});
}

absl::Status UringReader::ReadMany(const ReadFile& file, const std::vector<ReadExtent>& extents) {
  std::deque<Piece> pending;
  for (const ReadExtent& e : extents) {
    if (file.direct && (e.offset % kDirectAlignment != 0 || e.n % kDirectAlignment != 0 ||
                        reinterpret_cast<uintptr_t>(e.dst) % kDirectAlignment != 0)) {
      return absl::InvalidArgumentError(absl::StrCat("O_DIRECT read of ", file.path, " needs 4 KiB-aligned offset (", e.offset,
                                                     "), size (", e.n, ") and buffer"));
    }
    if (e.offset > file.size || e.n > file.size - e.offset) {
      return absl::DataLossError(absl::StrCat(file.path, ": read of [", e.offset, ", ", e.offset + e.n, ") past the end of the ",
                                              file.size, "-byte file"));
    }
    const int fixed = RegisteredIndex(e.dst, e.n);
    for (size_t done = 0; done < e.n; done += options_.block_bytes) {
      pending.push_back({e.offset + done, static_cast<char*>(e.dst) + done, std::min(options_.block_bytes, e.n - done), 0, fixed});
    }
  }
  std::vector<Piece> slots(options_.queue_depth);
  std::vector<unsigned> free_slots;
  for (unsigned i = 0; i < options_.queue_depth; ++i) free_slots.push_back(options_.queue_depth - 1 - i);
  unsigned in_flight = 0;
  absl::Status error;
  io_uring* ring = ring_.get();

  while ((error.ok() && !pending.empty()) || in_flight > 0) {
    unsigned queued = 0;
    while (error.ok() && !pending.empty() && !free_slots.empty()) {
      io_uring_sqe* sqe = io_uring_get_sqe(ring);
      if (sqe == nullptr) break;
      const unsigned slot = free_slots.back();
      free_slots.pop_back();
      slots[slot] = pending.front();
      pending.pop_front();
      const Piece& p = slots[slot];
      if (p.fixed >= 0) {
        io_uring_prep_read_fixed(sqe, file.fd.get(), p.dst, static_cast<unsigned>(p.len), p.offset, p.fixed);
      } else {
        io_uring_prep_read(sqe, file.fd.get(), p.dst, static_cast<unsigned>(p.len), p.offset);
      }
      io_uring_sqe_set_data64(sqe, slot);
      ++queued;
    }
    if (queued > 0) {
      int rc;
      do {
        rc = io_uring_submit(ring);
      } while (rc == -EINTR || rc == -EAGAIN || rc == -EBUSY);
      if (rc < 0) return absl::ErrnoToStatus(-rc, "io_uring_submit");  // nothing was queued
      in_flight += queued;
      requests_ += queued;
    }
    io_uring_cqe* cqe = nullptr;
    int rc;
    do {
      rc = io_uring_wait_cqe(ring, &cqe);
    } while (rc == -EINTR || rc == -EAGAIN);
    if (rc < 0) return absl::ErrnoToStatus(-rc, "io_uring_wait_cqe");
    do {
      const unsigned slot = static_cast<unsigned>(io_uring_cqe_get_data64(cqe));
      Piece p = slots[slot];
      int res = cqe->res;
      io_uring_cqe_seen(ring, cqe);
      --in_flight;
      free_slots.push_back(slot);
      if (options_.fault_hook) res = options_.fault_hook(res, p.len);
      if (res == -EAGAIN || res == -EINTR) {
        if (++p.retries > kMaxRetries) {
          if (error.ok()) error = absl::UnavailableError(absl::StrCat(file.path, ": read at ", p.offset, " kept failing with EAGAIN"));
        } else {
          ++resubmits_;
          pending.push_front(p);
        }
      } else if (res < 0) {
        if (error.ok()) error = absl::ErrnoToStatus(-res, absl::StrCat("read ", file.path, " at offset ", p.offset));
      } else if (res == 0) {
        if (error.ok()) error = absl::DataLossError(absl::StrCat(file.path, ": file ends at ", p.offset));
      } else if (static_cast<size_t>(res) < p.len) {
        // Short read: continue after what arrived (whole 4 KiB blocks under O_DIRECT).
        size_t got = static_cast<size_t>(res);
        if (file.direct) got = got / kDirectAlignment * kDirectAlignment;
        ++resubmits_;
        pending.push_front({p.offset + got, p.dst + got, p.len - got, got == 0 ? p.retries + 1 : 0, p.fixed});
        if (pending.front().retries > kMaxRetries && error.ok()) {
          error = absl::DataLossError(absl::StrCat(file.path, ": no progress reading at ", p.offset));
        }
      }
    } while (io_uring_peek_cqe(ring, &cqe) == 0);
  }
  return error;
}

}  // namespace ferry::io
