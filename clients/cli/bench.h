// `sparsekv bench`: a load generator for a running sparsekv server.
//
// A named workload creates its own sessions (ids "bench-WORKLOAD-PID-N..."), runs its timed
// ("main") phase for --duration or --requests, then deletes them:
//   prefill        each worker repeatedly creates a session, uploads --context tokens of every
//                  layer on one AppendKV stream (timed), and deletes it; reports MB/s
//   decode         unary Decode steps over --sessions pre-filled sessions, layers round robin
//   decode_stream  the same over one DecodeStream per worker, --inflight requests pipelined
//   mixed          decode steps that append a token (so the background pruner compresses the
//                  growing tails) on pruned sessions, while one more thread keeps uploading
//                  and deleting pruned sessions beside them (phase "background_append")
//   sessions       many small sessions (--sessions, default 1000): create, upload, unary
//                  decode steps spread over all of them (timed), delete
// Every operation is timed into a per-phase log-bucketed histogram (bench_histogram.h), so
// memory stays bounded however long the run. With --server_pid the server's CPU time over the
// main phase is read from /proc/PID/stat, giving requests per second per server core.
//
// Thread-safety: RunBench starts and joins its own threads; call it from one thread.
#ifndef SPARSEKV_CLIENTS_CLI_BENCH_H_
#define SPARSEKV_CLIENTS_CLI_BENCH_H_

#include <cstdint>
#include <map>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "clients/cli/args.h"
#include "clients/cli/bench_histogram.h"
#include "sparsekv/v1/kv_cache.pb.h"

namespace sparsekv::cli {

struct BenchOptions {
  std::string server = "localhost:50051";
  absl::Duration timeout = absl::Seconds(10);  // per call
  std::string workload = "decode";
  uint32_t sessions = 4;
  uint32_t layers = 1;
  uint32_t kv_heads = 8;
  uint32_t q_heads = 32;
  uint32_t head_dim = 128;
  v1::DType dtype = v1::DTYPE_FLOAT16;  // storage dtype; uploads travel in it too
  uint64_t context = 4096;              // tokens per layer uploaded before decoding
  float sparsity = 0.0f;                // K and V, per-token magnitude
  v1::DecodeCompute decode_compute = v1::DECODE_COMPUTE_UNSPECIFIED;  // of every session
  absl::Duration duration = absl::Seconds(10);
  uint64_t requests = 0;     // > 0: stop after this many main-phase requests instead
  uint32_t concurrency = 1;  // worker threads (each its own stream for decode_stream)
  uint32_t inflight = 1;     // decode_stream: requests in flight per stream
  uint32_t channels = 0;     // gRPC channels (TCP connections); 0 = one per worker
  bool append = false;       // decode, decode_stream: each step also appends a token
  int64_t message_bytes = (4 << 20) - (64 << 10);  // largest K+V payload per AppendKV message
  int server_pid = 0;                              // > 0: read this process's CPU time
  uint64_t seed = 1;
  bool progress = false;  // draw a progress bar on the error stream
};

// Reads the bench flags (set by ParseArgs) into options, applying the workload's defaults
// for flags not given (mixed: --sparsity 0.7 and --append; sessions: --sessions 1000,
// --context 256). Returns a usage error (exit 2) for an unknown workload or values out of
// range.
absl::StatusOr<BenchOptions> BenchOptionsFromFlags(const Invocation& inv);

// Figures of one phase.
struct BenchPhase {
  std::string name;
  uint64_t requests = 0;                   // operations finished, failed ones included
  uint64_t bytes = 0;                      // K+V payload bytes sent by successful operations
  std::map<std::string, uint64_t> errors;  // status code name -> count
  LatencyHistogram latency;                // successful operations only
  double seconds = 0;                      // wall time of the phase

  uint64_t error_count() const;
  void Merge(const BenchPhase& other);
};

struct BenchReport {
  BenchOptions options;
  std::string kernel_variant;  // from GetServerInfo
  // Decode arithmetic the server ran the sessions with (their stats); UNSPECIFIED when no
  // session was created.
  v1::DecodeCompute decode_compute_in_force = v1::DECODE_COMPUTE_UNSPECIFIED;
  std::vector<BenchPhase> phases;  // in the order they ran
  int main_phase = -1;             // index into phases
  double client_cpu_seconds = 0;   // this process, user + system, over the main phase
  double server_cpu_seconds = -1;  // over the main phase; < 0 when --server_pid was not given
  std::vector<std::pair<std::string, double>> extras;  // workload-specific figures

  const BenchPhase& main() const { return phases[main_phase]; }
};

// Runs the workload against options.server. Returns UNAVAILABLE (exit 3) when the server
// cannot be reached, the first error of a setup step (create, upload) otherwise; errors of
// the main phase are counted, not returned. Sessions it created are deleted before it
// returns, also on error. Progress goes to `progress_out` when options.progress.
absl::StatusOr<BenchReport> RunBench(const BenchOptions& options, std::ostream& progress_out);

// The report as text (with an ASCII histogram of the main phase) and as one JSON object.
std::string BenchReportText(const BenchReport& report);
std::string BenchReportJson(const BenchReport& report);

// CPU time (user + system) of process `pid` in seconds from /proc/PID/stat; NotFound when it
// cannot be read.
absl::StatusOr<double> ProcessCpuSeconds(int pid);
// Parses the text of a /proc/PID/stat file; `ticks_per_second` is sysconf(_SC_CLK_TCK).
absl::StatusOr<double> ParseProcStatCpuSeconds(const std::string& stat, double ticks_per_second);

// The `bench` subcommand: options from flags, RunBench, report to `out`.
absl::Status CmdBench(const Invocation& inv, std::ostream& out, std::ostream& err);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_BENCH_H_
