#include "kernels/cpu/thread_pool.h"

#include <memory>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace sparsekv::kernels {
namespace {

using Clock = std::chrono::steady_clock;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Polls `ready` until it returns true or `spin` has passed since `since`; returns its last value.
template <class Ready>
bool SpinUntil(Clock::time_point since, std::chrono::microseconds spin, Ready ready) {
  if (spin.count() <= 0) return ready();
  for (;;) {
    for (int i = 0; i < 16; ++i) {
      if (ready()) return true;
      CpuRelax();
    }
    if (Clock::now() - since > spin) return ready();
  }
}

}  // namespace

ThreadPool::ThreadPool(int threads, std::chrono::microseconds spin) : spin_(spin) {
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::WorkerLoop() {
  Clock::time_point last = Clock::now();
  for (;;) {
    SpinUntil(last, spin_, [this] {
      return queued_.load(std::memory_order_relaxed) > 0 || stop_.load(std::memory_order_relaxed);
    });
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_.load() || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      job = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
    }
    job();
    last = Clock::now();
  }
}

void ThreadPool::Run(int n, const std::function<void(int)>& task) {
  if (n <= 0) return;
  // Tasks are claimed through a shared counter by the pool and by this thread, so the caller
  // makes progress even when every worker is busy with another Run. A helper that starts after
  // all tasks were claimed touches only `shared`, never `task`.
  struct Shared {
    std::atomic<int> next{0};
    std::atomic<int> done{0};
    std::mutex mu;
    std::condition_variable done_cv;
  };
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, n, &task] {
    for (int i; (i = shared->next.fetch_add(1)) < n;) {
      task(i);
      if (shared->done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        // Under the mutex so a caller between its check and its wait cannot miss it.
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->done_cv.notify_all();
      }
    }
  };
  const int helpers = std::min(n - 1, size());
  if (helpers > 0) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int i = 0; i < helpers; ++i) queue_.emplace_back(drain);
      queued_.fetch_add(helpers, std::memory_order_relaxed);
    }
    if (helpers == 1) {
      cv_.notify_one();
    } else {
      cv_.notify_all();
    }
  }
  drain();
  auto all_done = [&] { return shared->done.load(std::memory_order_acquire) == n; };
  if (SpinUntil(Clock::now(), spin_, all_done)) return;
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->done_cv.wait(lock, all_done);
}

}  // namespace sparsekv::kernels
