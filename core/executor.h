// A fixed pool of background threads with a bounded FIFO queue, for pruning jobs.
//
// Thread-safe. Jobs must not block on other jobs of the same executor.
#ifndef SPARSEKV_CORE_EXECUTOR_H_
#define SPARSEKV_CORE_EXECUTOR_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sparsekv {

class BoundedExecutor {
 public:
  // `nice` > 0 lowers the workers' scheduling priority (Linux thread nice value), so that
  // background work yields the CPU to request handling.
  BoundedExecutor(int threads, int max_queue, int nice = 0);
  ~BoundedExecutor();  // Shutdown()
  BoundedExecutor(const BoundedExecutor&) = delete;
  BoundedExecutor& operator=(const BoundedExecutor&) = delete;

  // Queues `job`; false (job dropped) when the queue is full or the executor is shut down.
  bool TrySchedule(std::function<void()> job);
  // Stops accepting jobs, drops the queued ones, waits for running ones. Idempotent.
  void Shutdown();

  int queued() const;
  int running() const;

 private:
  void WorkerLoop(int nice);

  const int max_queue_;
  std::mutex shutdown_mu_;  // serialises Shutdown
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  int running_ = 0;                          // guarded by mu_
  bool stop_ = false;                        // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CORE_EXECUTOR_H_
