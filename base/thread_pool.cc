#include "base/thread_pool.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace ferry {

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) {
    const char* env = std::getenv("FERRY_NUM_THREADS");
    threads = env != nullptr ? std::atoi(env) : 0;
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    threads = std::min(threads, kMaxThreads);  // an environment value is not trusted to be sane
  }
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = new ThreadPool();  // never destroyed: safe at exit
  return *pool;
}

bool ThreadPool::RunOneChunk() {
  int64_t begin;
  const std::function<void(int64_t, int64_t)>* fn;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (fn_ == nullptr || next_ >= n_) return false;
    begin = next_;
    next_ = std::min(n_, next_ + chunk_);
    fn = fn_;
  }
  (*fn)(begin, std::min(n_, begin + chunk_));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (--pending_ == 0) done_cv_.notify_all();
  }
  return true;
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || (generation_ != seen && fn_ != nullptr && next_ < n_); });
      if (stop_) return;
      seen = generation_;
    }
    while (RunOneChunk()) {
    }
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (workers_.empty() || n <= grain) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mu_);
  const int64_t max_chunks = static_cast<int64_t>(size()) * 4;
  const int64_t chunk = std::max(grain, (n + max_chunks - 1) / max_chunks);
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    chunk_ = chunk;
    next_ = 0;
    pending_ = (n + chunk - 1) / chunk;
    ++generation_;
  }
  work_cv_.notify_all();
  while (RunOneChunk()) {
  }
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  fn_ = nullptr;
}

}  // namespace ferry
