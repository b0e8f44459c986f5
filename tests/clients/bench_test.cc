// Tests of `sparsekv bench` and `sparsekv demo` that need no server: option parsing and
// defaults, /proc/PID/stat parsing, and the demo's data and error helpers.
#include "clients/cli/bench.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/flags/reflection.h"
#include "clients/cli/args.h"
#include "clients/cli/commands.h"
#include "clients/cli/demo.h"
#include "gtest/gtest.h"

namespace sparsekv::cli {
namespace {

absl::StatusOr<BenchOptions> Options(std::vector<std::string> args) {
  args.insert(args.begin(), {"sparsekv", "bench"});
  absl::StatusOr<Invocation> inv = ParseArgs(args);
  if (!inv.ok()) return inv.status();
  return BenchOptionsFromFlags(*inv);
}

TEST(BenchOptionsTest, DefaultsAreADecodeRunAt4kContext) {
  absl::FlagSaver saver;
  absl::StatusOr<BenchOptions> o = Options({});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->workload, "decode");
  EXPECT_EQ(o->context, 4096u);
  EXPECT_EQ(o->layers, 1u);
  EXPECT_EQ(o->kv_heads, 8u);
  EXPECT_EQ(o->q_heads, 32u);
  EXPECT_EQ(o->head_dim, 128u);
  EXPECT_EQ(o->sessions, 4u);
  EXPECT_EQ(o->sparsity, 0.0f);
  EXPECT_FALSE(o->append);
  EXPECT_EQ(o->duration, absl::Seconds(10));
  EXPECT_EQ(o->requests, 0u);
  EXPECT_EQ(o->dtype, v1::DTYPE_FLOAT16);
  EXPECT_EQ(o->decode_compute, v1::DECODE_COMPUTE_UNSPECIFIED);
}

TEST(BenchOptionsTest, ParsesEveryFlag) {
  absl::FlagSaver saver;
  absl::StatusOr<BenchOptions> o = Options({"--workload=decode_stream",
                                            "--sessions=3",
                                            "--layers=2",
                                            "--kv_heads=1",
                                            "--q_heads=4",
                                            "--head_dim=64",
                                            "--dtype=float32",
                                            "--context=64",
                                            "--sparsity=0.5",
                                            "--duration=2s",
                                            "--requests=100",
                                            "--concurrency=4",
                                            "--inflight=16",
                                            "--channels=2",
                                            "--append",
                                            "--message_bytes=1024",
                                            "--server_pid=123",
                                            "--seed=9",
                                            "--decode_compute=f16",
                                            "--server=h:1",
                                            "--json"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->workload, "decode_stream");
  EXPECT_EQ(o->sessions, 3u);
  EXPECT_EQ(o->layers, 2u);
  EXPECT_EQ(o->kv_heads, 1u);
  EXPECT_EQ(o->q_heads, 4u);
  EXPECT_EQ(o->head_dim, 64u);
  EXPECT_EQ(o->dtype, v1::DTYPE_FLOAT32);
  EXPECT_EQ(o->context, 64u);
  EXPECT_FLOAT_EQ(o->sparsity, 0.5f);
  EXPECT_EQ(o->duration, absl::Seconds(2));
  EXPECT_EQ(o->requests, 100u);
  EXPECT_EQ(o->concurrency, 4u);
  EXPECT_EQ(o->inflight, 16u);
  EXPECT_EQ(o->channels, 2u);
  EXPECT_TRUE(o->append);
  EXPECT_EQ(o->message_bytes, 1024);
  EXPECT_EQ(o->server_pid, 123);
  EXPECT_EQ(o->seed, 9u);
  EXPECT_EQ(o->decode_compute, v1::DECODE_COMPUTE_FLOAT16);
  EXPECT_EQ(o->server, "h:1");
}

TEST(BenchOptionsTest, WorkloadsHaveTheirOwnDefaults) {
  absl::FlagSaver saver;
  absl::StatusOr<BenchOptions> mixed = Options({"--workload=mixed"});
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  EXPECT_FLOAT_EQ(mixed->sparsity, 0.7f);
  EXPECT_TRUE(mixed->append);
  absl::StatusOr<BenchOptions> sessions = Options({"--workload=sessions"});
  ASSERT_TRUE(sessions.ok()) << sessions.status();
  EXPECT_EQ(sessions->sessions, 1000u);
  EXPECT_EQ(sessions->context, 256u);
  // A flag given explicitly wins over the workload's default.
  sessions = Options({"--workload=sessions", "--sessions=5", "--context=0"});
  ASSERT_TRUE(sessions.ok()) << sessions.status();
  EXPECT_EQ(sessions->sessions, 5u);
  EXPECT_EQ(sessions->context, 0u);
  absl::StatusOr<BenchOptions> q = Options({"--kv_heads=2"});
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->q_heads, 8u);  // GQA group 4 unless --q_heads says otherwise
}

TEST(BenchOptionsTest, RejectsBadValuesAsUsageErrors) {
  absl::FlagSaver saver;
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--workload=bogus"},
           {"--sparsity=1"},
           {"--sparsity=-0.1"},
           {"--concurrency=0"},
           {"--inflight=0"},
           {"--kv_heads=3", "--q_heads=4"},
           {"--head_dim=0"},
           {"--sessions=0"},
           {"--duration=0s"},
           {"--message_bytes=0"},
           {"--workload=prefill", "--context=0"},
           {"--server_pid=-1"},
           {"--decode_compute=f8"},
       }) {
    absl::StatusOr<BenchOptions> o = Options(args);
    ASSERT_FALSE(o.ok()) << args[0];
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument) << args[0];
    EXPECT_EQ(ExitCodeFor(o.status()), kExitUsage) << args[0];
  }
  // --requests replaces --duration as the stop condition.
  EXPECT_TRUE(Options({"--duration=0s", "--requests=5"}).ok());
}

TEST(BenchOptionsTest, BenchAndDemoRejectOtherCommandsFlags) {
  absl::FlagSaver saver;
  EXPECT_FALSE(ParseArgs({"sparsekv", "bench", "--k_out=x"}).ok());
  EXPECT_FALSE(ParseArgs({"sparsekv", "demo", "--workload=decode"}).ok());
  EXPECT_FALSE(ParseArgs({"sparsekv", "list", "--concurrency=2"}).ok());
  EXPECT_TRUE(ParseArgs({"sparsekv", "demo", "--context=512", "--steps=4", "--json"}).ok());
}

TEST(ProcStatTest, ParsesUserPlusSystemTime) {
  // Field 2 may hold spaces and parentheses; utime = 1500, stime = 500 ticks.
  const std::string stat =
      "1234 (my (weird) server) S 1 1234 1234 0 -1 4194560 100 0 0 0 1500 500 0 0 20 0 9 0 "
      "100 1000000 500 18446744073709551615\n";
  absl::StatusOr<double> s = ParseProcStatCpuSeconds(stat, 100.0);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_DOUBLE_EQ(*s, 20.0);
  EXPECT_FALSE(ParseProcStatCpuSeconds("garbage", 100.0).ok());
  EXPECT_FALSE(ParseProcStatCpuSeconds("1 (x) S 1 2", 100.0).ok());
}

TEST(ProcStatTest, ReadsThisProcess) {
  absl::StatusOr<double> s = ProcessCpuSeconds(getpid());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_GE(*s, 0.0);
  EXPECT_EQ(ProcessCpuSeconds(0x7ffffff0).status().code(), absl::StatusCode::kNotFound);
}

TEST(DemoTest, SyntheticLayerIsDeterministicAndStructured) {
  const SyntheticLayer a = MakeSyntheticLayer(1, 0, 64, 2, 4, 32, 3);
  const SyntheticLayer b = MakeSyntheticLayer(1, 0, 64, 2, 4, 32, 3);
  const SyntheticLayer c = MakeSyntheticLayer(1, 1, 64, 2, 4, 32, 3);
  ASSERT_EQ(a.k.size(), 64u * 2 * 32);
  ASSERT_EQ(a.v.size(), 64u * 2 * 32);
  ASSERT_EQ(a.q.size(), 3u * 4 * 32);
  EXPECT_EQ(a.k, b.k);
  EXPECT_EQ(a.q, b.q);
  EXPECT_NE(a.k, c.k);  // layers differ
  // Outlier channels: the largest per-channel mean |K| of a head is several times the median.
  std::vector<double> mean_abs(32, 0.0);
  for (size_t t = 0; t < 64; ++t) {
    for (size_t j = 0; j < 32; ++j) mean_abs[j] += std::fabs(a.k[(t * 2 + 0) * 32 + j]) / 64;
  }
  std::vector<double> sorted = mean_abs;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_GT(sorted.back(), 3 * sorted[16]);
}

TEST(DemoTest, MeanRowRelativeError) {
  const std::vector<float> want = {3, 4, 0, 0, 1, 0};
  const std::vector<float> got = {3, 4, 5, 5, 2, 0};
  // Rows of 2: errors 0, skipped (zero reference), 1.
  EXPECT_DOUBLE_EQ(MeanRowRelativeError(got, want, 2), 0.5);
  EXPECT_DOUBLE_EQ(MeanRowRelativeError(want, want, 3), 0.0);
}

}  // namespace
}  // namespace sparsekv::cli
