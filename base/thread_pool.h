// A fixed pool of worker threads with a blocking ParallelFor. Work is split into contiguous
// chunks, so which thread computes an element never changes what is computed (results do not
// depend on the thread count).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ferry {

class ThreadPool {
 public:
  // At most this many threads (FERRY_NUM_THREADS above it is cut to it; --threads above it is refused).
  static constexpr int kMaxThreads = 1024;
  // threads <= 0: one per hardware thread (or FERRY_NUM_THREADS when set).
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over [0, n) in chunks of at least `grain`; returns when all are done.
  // The calling thread takes part. Not reentrant: fn must not call ParallelFor on this pool.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  // The process-wide pool used by the CPU backend.
  static ThreadPool& Default();

 private:
  void WorkerLoop();
  bool RunOneChunk();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::mutex call_mu_;  // serializes ParallelFor calls from different threads
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 0;
  int64_t next_ = 0;
  int64_t pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace ferry
