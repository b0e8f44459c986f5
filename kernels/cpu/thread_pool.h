// A fixed-size pool of worker threads for splitting one kernel call across cores.
//
// Thread-safe: Run may be called from several threads at once; each call blocks until its own
// tasks are done. Tasks must not call Run on the same pool (no nested parallelism).
//
// Spin-then-block: after a task, a worker polls for new work for `spin` before it sleeps on a
// condition variable, and Run's caller polls for its helpers before it sleeps. A decode step
// is 50-500 us of work; waking a sleeping thread costs tens of microseconds on bare metal and
// ~100 us on a virtual machine whose idle vCPU halted (measured here: a 4096-token step split
// over 2 threads ran no faster than on one, because the caller had finished both halves
// before the helper woke). The same trade OpenMP runtimes make with their block time; the
// cost is up to `spin` of one core per worker after each burst of steps.
#ifndef SPARSEKV_KERNELS_CPU_THREAD_POOL_H_
#define SPARSEKV_KERNELS_CPU_THREAD_POOL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sparsekv::kernels {

class ThreadPool {
 public:
  static constexpr std::chrono::microseconds kDefaultSpin{250};

  // threads = 0 means std::thread::hardware_concurrency(); spin = 0 never polls.
  explicit ThreadPool(int threads, std::chrono::microseconds spin = kDefaultSpin);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()); }
  std::chrono::microseconds spin() const { return spin_; }

  // Runs task(0) .. task(n - 1), the calling thread taking part, and returns when all are done.
  void Run(int n, const std::function<void(int)>& task);

 private:
  void WorkerLoop();

  const std::chrono::microseconds spin_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  std::atomic<int> queued_{0};               // queue_.size(), readable without mu_
  std::atomic<bool> stop_{false};            // written under mu_
  std::vector<std::thread> workers_;
};

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_THREAD_POOL_H_
