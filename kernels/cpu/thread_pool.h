// A fixed-size pool of worker threads for splitting one kernel call across cores.
//
// Thread-safe: Run may be called from several threads at once; each call blocks until its own
// tasks are done. Tasks must not call Run on the same pool (no nested parallelism).
#ifndef SPARSEKV_KERNELS_CPU_THREAD_POOL_H_
#define SPARSEKV_KERNELS_CPU_THREAD_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sparsekv::kernels {

class ThreadPool {
 public:
  // threads = 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()); }

  // Runs task(0) .. task(n - 1), the calling thread taking part, and returns when all are done.
  void Run(int n, const std::function<void(int)>& task);

 private:
  void WorkerLoop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  bool stop_ = false;                        // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_THREAD_POOL_H_
