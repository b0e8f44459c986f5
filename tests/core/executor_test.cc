// BoundedExecutor: every accepted job runs once, the queue bound refuses the job past it,
// queued()/running() count, Shutdown drops queued jobs, waits for running ones and leaves no
// job to run after it returns, and workers run at the requested nice level.
#include "core/executor.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

namespace sparsekv {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

// A one-shot gate that jobs block on until the test opens it.
class Gate {
 public:
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Polls `done` for up to 10 s (generous: 2 shared vCPUs, TSan); returns its last value.
template <class Pred>
bool WaitFor(Pred done) {
  const auto deadline = steady_clock::now() + std::chrono::seconds(10);
  while (!done()) {
    if (steady_clock::now() > deadline) return done();
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

int ThreadNice() {
  errno = 0;
  return getpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)));
}

TEST(BoundedExecutorTest, RunsEveryScheduledJobExactlyOnce) {
  constexpr int kJobs = 2000;
  BoundedExecutor ex(3, kJobs);
  std::vector<std::atomic<int>> runs(kJobs);
  for (int i = 0; i < kJobs; ++i) {
    ASSERT_TRUE(ex.TrySchedule([&runs, i] { runs[i].fetch_add(1); })) << "job " << i;
  }
  std::atomic<int> total{0};
  ASSERT_TRUE(WaitFor([&] {
    int n = 0;
    for (auto& r : runs) n += r.load();
    total = n;
    return n == kJobs;
  })) << "ran "
      << total.load() << " of " << kJobs;
  ex.Shutdown();
  for (int i = 0; i < kJobs; ++i) EXPECT_EQ(runs[i].load(), 1) << "job " << i;
}

TEST(BoundedExecutorTest, JobsScheduledFromSeveralThreadsAllRun) {
  constexpr int kThreads = 4, kPerThread = 300;
  BoundedExecutor ex(2, kThreads * kPerThread);
  std::atomic<int> ran{0};
  std::vector<std::thread> producers;
  std::atomic<int> accepted{0};
  for (int t = 0; t < kThreads; ++t) {
    producers.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) accepted += ex.TrySchedule([&ran] { ++ran; });
    });
  }
  for (std::thread& t : producers) t.join();
  // The bound covers every job, so none may be refused.
  EXPECT_EQ(accepted.load(), kThreads * kPerThread);
  EXPECT_TRUE(WaitFor([&] { return ran.load() == kThreads * kPerThread; })) << ran.load();
}

TEST(BoundedExecutorTest, RefusesPastTheQueueBoundAndCounts) {
  constexpr int kBound = 5;
  BoundedExecutor ex(1, kBound);
  Gate gate;
  std::promise<void> started;
  ASSERT_TRUE(ex.TrySchedule([&] {
    started.set_value();
    gate.Wait();
  }));
  started.get_future().wait();  // the only worker is now busy; the queue is empty
  EXPECT_EQ(ex.running(), 1);
  EXPECT_EQ(ex.queued(), 0);

  std::atomic<int> ran{0};
  for (int i = 0; i < kBound; ++i) {
    EXPECT_TRUE(ex.TrySchedule([&ran] { ++ran; })) << "job " << i;
    EXPECT_EQ(ex.queued(), i + 1);
  }
  // The running job does not count against the bound; the queued ones do.
  bool refused_ran = false;
  EXPECT_FALSE(ex.TrySchedule([&refused_ran] { refused_ran = true; }));
  EXPECT_EQ(ex.queued(), kBound);

  gate.Open();
  EXPECT_TRUE(WaitFor([&] { return ran.load() == kBound; })) << ran.load();
  EXPECT_TRUE(WaitFor([&] { return ex.running() == 0; }));
  EXPECT_EQ(ex.queued(), 0);
  // Room again once the queue drained.
  EXPECT_TRUE(ex.TrySchedule([&ran] { ++ran; }));
  EXPECT_TRUE(WaitFor([&] { return ran.load() == kBound + 1; }));
  ex.Shutdown();
  EXPECT_FALSE(refused_ran);
}

TEST(BoundedExecutorTest, WithoutWorkersJobsOnlyQueue) {
  BoundedExecutor ex(0, 3);
  bool ran = false;
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(ex.TrySchedule([&ran] { ran = true; }));
  EXPECT_FALSE(ex.TrySchedule([&ran] { ran = true; }));
  EXPECT_EQ(ex.queued(), 3);
  EXPECT_EQ(ex.running(), 0);
  ex.Shutdown();
  EXPECT_EQ(ex.queued(), 0);
  EXPECT_FALSE(ran);
}

TEST(BoundedExecutorTest, ShutdownDropsQueuedJobsAndWaitsForRunningOnes) {
  BoundedExecutor ex(1, 16);
  Gate gate;
  std::promise<void> started;
  std::atomic<bool> running_job_finished{false};
  ASSERT_TRUE(ex.TrySchedule([&] {
    started.set_value();
    gate.Wait();
    std::this_thread::sleep_for(milliseconds(20));  // still running when the gate opens
    running_job_finished = true;
  }));
  started.get_future().wait();
  std::atomic<int> queued_ran{0};
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(ex.TrySchedule([&queued_ran] { ++queued_ran; }));
  ASSERT_EQ(ex.queued(), 8);

  std::atomic<bool> shutdown_returned{false};
  std::thread closer([&] {
    ex.Shutdown();
    shutdown_returned = true;
  });
  // Shutdown must not return while a job runs. It drops the queue at once.
  EXPECT_TRUE(WaitFor([&] { return ex.queued() == 0; }));
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_FALSE(shutdown_returned.load()) << "Shutdown returned while a job was running";
  EXPECT_EQ(ex.running(), 1);
  gate.Open();
  closer.join();
  EXPECT_TRUE(running_job_finished.load()) << "Shutdown returned before the running job ended";
  EXPECT_EQ(ex.running(), 0);
  EXPECT_EQ(queued_ran.load(), 0) << "a job queued at Shutdown ran";
}

TEST(BoundedExecutorTest, NoJobRunsAfterShutdownReturns) {
  BoundedExecutor ex(2, 1000);
  std::atomic<bool> shut{false};
  std::atomic<int> late{0};
  std::atomic<int> ran{0};
  for (int i = 0; i < 1000; ++i) {
    ex.TrySchedule([&] {
      if (shut.load()) ++late;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      ++ran;
    });
  }
  ex.Shutdown();
  shut = true;
  const int ran_at_shutdown = ran.load();
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_EQ(late.load(), 0);
  EXPECT_EQ(ran.load(), ran_at_shutdown);  // nothing finished after Shutdown returned
  EXPECT_LT(ran_at_shutdown, 1000);        // the queue was dropped, not drained
  // Refused afterwards, and the refused job never runs.
  EXPECT_FALSE(ex.TrySchedule([&late] { ++late; }));
  std::this_thread::sleep_for(milliseconds(10));
  EXPECT_EQ(late.load(), 0);
  EXPECT_EQ(ex.queued(), 0);
  EXPECT_EQ(ex.running(), 0);
}

TEST(BoundedExecutorTest, ShutdownIsIdempotentAndDestructionAfterItIsSafe) {
  auto ex = std::make_unique<BoundedExecutor>(2, 4);
  std::atomic<int> ran{0};
  ASSERT_TRUE(ex->TrySchedule([&ran] { ++ran; }));
  ASSERT_TRUE(WaitFor([&] { return ran.load() == 1; }));
  ex->Shutdown();
  ex->Shutdown();
  EXPECT_FALSE(ex->TrySchedule([&ran] { ++ran; }));
  ex.reset();  // destructor calls Shutdown a third time
  EXPECT_EQ(ran.load(), 1);
}

TEST(BoundedExecutorTest, DestructionDropsQueuedJobs) {
  std::atomic<int> ran{0};
  Gate gate;
  std::promise<void> started;
  std::thread opener;
  {
    BoundedExecutor ex(1, 8);
    ASSERT_TRUE(ex.TrySchedule([&] {
      started.set_value();
      gate.Wait();
    }));
    started.get_future().wait();
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(ex.TrySchedule([&ran] { ++ran; }));
    // Opens the gate once the destructor has dropped the queue (it is then blocked joining the
    // worker, so `ex` is still whole).
    opener = std::thread([&gate, &ex] {
      WaitFor([&ex] { return ex.queued() == 0; });
      gate.Open();
    });
  }  // ~BoundedExecutor: drops the 4 queued jobs, waits for the gated one
  opener.join();
  EXPECT_EQ(ran.load(), 0);
}

// Workers set their own nice value; the scheduling thread keeps its own.
TEST(BoundedExecutorTest, WorkersRunAtTheRequestedNiceLevel) {
  const int base = ThreadNice();
  if (base >= 10) GTEST_SKIP() << "test process already runs at nice " << base;
  for (int requested : {0, 10}) {
    BoundedExecutor ex(2, 8);
    BoundedExecutor niced(2, 8, requested);
    std::promise<int> plain_p, niced_p;
    ASSERT_TRUE(ex.TrySchedule([&] { plain_p.set_value(ThreadNice()); }));
    ASSERT_TRUE(niced.TrySchedule([&] { niced_p.set_value(ThreadNice()); }));
    EXPECT_EQ(plain_p.get_future().get(), base);
    EXPECT_EQ(niced_p.get_future().get(), requested > 0 ? requested : base)
        << "requested nice " << requested;
    EXPECT_EQ(ThreadNice(), base) << "the caller's priority changed";
  }
}

// Two threads calling Shutdown at once used to both join the same std::threads (the second
// join threw std::system_error or hung). Run in a child process with an alarm, so that an
// abort or a hang fails this test instead of the whole binary.
TEST(BoundedExecutorDeathTest, ConcurrentShutdownCallsAreSafe) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        alarm(10);  // a hang in join ends the child by SIGALRM: the test fails, not the run
        for (int it = 0; it < 200; ++it) {
          BoundedExecutor ex(4, 8);
          std::atomic<bool> go{false};
          ex.TrySchedule([] { std::this_thread::sleep_for(milliseconds(2)); });
          std::thread a([&] {
            while (!go.load()) {
            }
            ex.Shutdown();
          });
          std::thread b([&] {
            while (!go.load()) {
            }
            ex.Shutdown();
          });
          go = true;
          a.join();
          b.join();
        }
        std::_Exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace sparsekv
