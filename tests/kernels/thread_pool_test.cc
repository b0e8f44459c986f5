// ThreadPool: Run executes task(0) .. task(n - 1) exactly once each and returns only when all
// are done (the writes of every task visible to the caller: plain memory, checked by TSan),
// from several callers at once, polling or not; a caller finishes its tasks alone when every
// worker is busy; destruction of an idle pool returns without waiting out the spin.
#include "kernels/cpu/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace sparsekv::kernels {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

// Runs `n` tasks that each increment their own plain (non-atomic) slot, and checks every slot
// is 1 after Run: a task run twice or not at all, or a Run that returned early, shows as a
// count other than 1 (or, under TSan, as a race on the slot).
void ExpectEachTaskOnce(ThreadPool* pool, int n) {
  std::vector<int> runs(static_cast<size_t>(n), 0);
  pool->Run(n, [&runs](int i) { ++runs[static_cast<size_t>(i)]; });
  int wrong = 0;
  for (int i = 0; i < n; ++i) wrong += runs[static_cast<size_t>(i)] != 1;
  EXPECT_EQ(wrong, 0) << "n = " << n << ", pool of " << pool->size() << ", spin "
                      << pool->spin().count() << " us";
}

class ThreadPoolSpinTest : public ::testing::TestWithParam<int> {
 protected:
  microseconds spin() const { return microseconds(GetParam()); }
};

TEST_P(ThreadPoolSpinTest, EveryTaskRunsExactlyOnce) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads, spin());
    EXPECT_EQ(pool.size(), threads);
    EXPECT_EQ(pool.spin(), spin());
    for (int n : {1, 2, 3, 4, 7, 64, 1000}) ExpectEachTaskOnce(&pool, n);
  }
}

TEST_P(ThreadPoolSpinTest, RunWithNoTasksCallsNothing) {
  ThreadPool pool(2, spin());
  std::atomic<int> calls{0};
  pool.Run(0, [&calls](int) { ++calls; });
  pool.Run(-3, [&calls](int) { ++calls; });
  EXPECT_EQ(calls.load(), 0);
  ExpectEachTaskOnce(&pool, 5);  // still usable
}

// Slow tasks: Run must wait for the helpers' tasks, not only its own.
TEST_P(ThreadPoolSpinTest, RunReturnsOnlyWhenEveryTaskIsDone) {
  ThreadPool pool(2, spin());
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<int> done(6, 0);
    pool.Run(6, [&done](int i) {
      std::this_thread::sleep_for(milliseconds(i % 2 == 0 ? 5 : 1));
      done[static_cast<size_t>(i)] = 1;
    });
    for (int i = 0; i < 6; ++i) EXPECT_EQ(done[static_cast<size_t>(i)], 1) << "task " << i;
  }
}

TEST_P(ThreadPoolSpinTest, SeveralCallersConcurrently) {
  ThreadPool pool(2, spin());
  constexpr int kCallers = 4, kRuns = 200;
  std::atomic<int> bad{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&pool, &bad, c] {
      for (int r = 0; r < kRuns; ++r) {
        const int n = 1 + (r * 7 + c) % 13;
        std::vector<int> runs(static_cast<size_t>(n), 0);
        pool.Run(n, [&runs](int i) { ++runs[static_cast<size_t>(i)]; });
        for (int x : runs) bad += x != 1;
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(bad.load(), 0);
}

// Both workers blocked inside another caller's tasks: a second caller still completes its own
// Run on its own thread (its queued helpers start later, find nothing left and must not touch
// the finished Run's task).
TEST_P(ThreadPoolSpinTest, CallerFinishesAloneWhenEveryWorkerIsBusy) {
  ThreadPool pool(2, spin());
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  std::atomic<int> blocked{0};
  std::thread first([&] {
    pool.Run(3, [&](int) {
      ++blocked;
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return release; });
    });
  });
  // Two workers plus the first caller hold the three tasks.
  const auto deadline = steady_clock::now() + std::chrono::seconds(10);
  while (blocked.load() < 3 && steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  ASSERT_EQ(blocked.load(), 3);

  auto second = std::async(std::launch::async, [&pool] {
    auto runs = std::make_unique<std::vector<int>>(5, 0);
    pool.Run(5, [&runs](int i) { ++(*runs)[static_cast<size_t>(i)]; });
    int ok = 0;
    for (int x : *runs) ok += x == 1;
    runs.reset();  // the task's state dies before the stale helpers run
    return ok;
  });
  const bool finished = second.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  EXPECT_TRUE(finished) << "Run waited for workers busy with another caller";
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  first.join();
  EXPECT_EQ(second.get(), 5);
  ExpectEachTaskOnce(&pool, 9);  // the stale helpers drained harmlessly
}

TEST_P(ThreadPoolSpinTest, DestructionWhileIdle) {
  for (int rep = 0; rep < 20; ++rep) {
    ThreadPool pool(3, spin());
    if (rep % 2 == 1) ExpectEachTaskOnce(&pool, 4);
    if (rep % 4 == 3) std::this_thread::sleep_for(milliseconds(2));  // workers asleep
  }
}

INSTANTIATE_TEST_SUITE_P(Spin, ThreadPoolSpinTest, ::testing::Values(0, 50, 250),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "spin" + std::to_string(info.param) + "us";
                         });

// A pool spinning far longer than the test may wait: destruction right after a burst must not
// wait out the workers' spin (they watch the stop flag while polling).
TEST(ThreadPoolTest, DestructionDoesNotWaitOutTheSpin) {
  const auto start = steady_clock::now();
  {
    ThreadPool pool(2, std::chrono::seconds(30));
    ExpectEachTaskOnce(&pool, 8);
  }
  EXPECT_LT(steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(ThreadPoolTest, ZeroThreadsMeansHardwareConcurrency) {
  ThreadPool pool(0, microseconds(0));
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  EXPECT_EQ(pool.size(), hw > 0 ? hw : 1);
  EXPECT_EQ(ThreadPool(1).spin(), ThreadPool::kDefaultSpin);
  ExpectEachTaskOnce(&pool, 33);
}

// Tasks run on the pool's workers as well as on the caller (the work is split, not serial).
TEST(ThreadPoolTest, TasksRunOnWorkersToo) {
  ThreadPool pool(2, microseconds(250));
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<int> on_workers{0};
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  std::atomic<int> met{0};
  // Three tasks that wait (up to 10 s) for each other: they all meet only on three threads.
  pool.Run(3, [&](int) {
    if (std::this_thread::get_id() != caller) ++on_workers;
    std::unique_lock<std::mutex> lock(mu);
    ++arrived;
    cv.notify_all();
    met += cv.wait_for(lock, std::chrono::seconds(10), [&] { return arrived == 3; });
  });
  EXPECT_EQ(met.load(), 3);
  EXPECT_EQ(on_workers.load(), 2);
}

}  // namespace
}  // namespace sparsekv::kernels
