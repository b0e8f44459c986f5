#include "core/executor.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace sparsekv {

BoundedExecutor::BoundedExecutor(int threads, int max_queue, int nice) : max_queue_(max_queue) {
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this, nice] { WorkerLoop(nice); });
}

BoundedExecutor::~BoundedExecutor() { Shutdown(); }

bool BoundedExecutor::TrySchedule(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || static_cast<int>(queue_.size()) >= max_queue_) return false;
    queue_.push_back(std::move(job));
  }
  cv_.notify_one();
  return true;
}

void BoundedExecutor::Shutdown() {
  // One caller at a time joins; a concurrent or later caller waits here, then finds no
  // workers left (joining a thread twice is undefined).
  std::lock_guard<std::mutex> serial(shutdown_mu_);
  std::vector<std::thread> workers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    queue_.clear();
    workers.swap(workers_);
  }
  cv_.notify_all();
  for (std::thread& t : workers) t.join();
}

void BoundedExecutor::WorkerLoop(int nice) {
#if defined(__linux__)
  // Best effort: failing leaves the default priority.
  if (nice > 0) setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice);
#endif
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    job();
    std::lock_guard<std::mutex> lock(mu_);
    --running_;
  }
}

int BoundedExecutor::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(queue_.size());
}

int BoundedExecutor::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

}  // namespace sparsekv
