#include "kernels/cpu/thread_pool.h"

#include <atomic>

namespace sparsekv::kernels {

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
  }
}

void ThreadPool::Run(int n, const std::function<void(int)>& task) {
  if (n <= 0) return;
  // Tasks are claimed through a shared counter by the pool and by this thread, so the caller
  // makes progress even when every worker is busy with another Run.
  struct Shared {
    std::atomic<int> next{0};
    std::mutex mu;
    std::condition_variable done_cv;
    int done = 0;
  };
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, n, &task] {
    for (int i; (i = shared->next.fetch_add(1)) < n;) {
      task(i);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (++shared->done == n) shared->done_cv.notify_all();
    }
  };
  const int helpers = std::min(n - 1, size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int i = 0; i < helpers; ++i) queue_.emplace_back(drain);
  }
  if (helpers == 1) {
    cv_.notify_one();
  } else if (helpers > 1) {
    cv_.notify_all();
  }
  drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->done_cv.wait(lock, [&] { return shared->done == n; });
}

}  // namespace sparsekv::kernels
