// sparsekv-server: the KV-cache compression service. Flags are documented by --help.
#include <malloc.h>
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "service/server.h"

ABSL_FLAG(std::string, listen, "",
          "gRPC listen address HOST:PORT; port 0 = any. Default: 127.0.0.1:50051 for a plaintext "
          "port (only this host can reach it), 0.0.0.0:50051 with --tls_cert_file");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9464",
          "Prometheus /metrics listen address HOST:PORT; port 0 = any; empty = off");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain for TLS on the gRPC port (with --tls_key_file); empty = "
          "plaintext");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA certificates: with them the gRPC port requires and verifies a client "
          "certificate signed by one (mutual TLS)");
ABSL_FLAG(std::string, auth, "none",
          "Who may call: `none` = anyone who reaches the gRPC port, with every right on every "
          "session (logged loudly at start); `token` = an `authorization: Bearer TOKEN` of "
          "--auth_token_file on every call except gRPC health and reflection");
ABSL_FLAG(std::string, auth_token_file, "",
          "With --auth=token: file of `TOKEN TENANT ROLE` lines (ROLE user or admin; README "
          "\"Auth and tenants\"); reread within a second when it changes, a bad version keeps "
          "the previous tokens");
ABSL_FLAG(int, max_message_bytes, 64 << 20,
          "Largest gRPC message accepted, in bytes; larger ones get RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, host_budget_bytes, -1,
          "Byte budget for all sessions in host memory (K/V, dense-block slack, scoring "
          "statistics, metadata); -1 = half of the memory available to the process (the "
          "smaller of physical memory and the cgroup limit); 0 = unlimited. Requests over it "
          "get RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, tenant_budget_bytes, 0, "Byte budget per tenant; 0 = unlimited");
ABSL_FLAG(int, max_sessions, 100000, "Most live sessions; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_sessions_per_tenant, 0,
          "Most live sessions of one tenant; more get RESOURCE_EXHAUSTED; 0 = only "
          "--max_sessions");
ABSL_FLAG(int64_t, max_session_bytes, 0,
          "Most bytes one session may hold against the budget; 0 = only the host and tenant "
          "budgets apply");
ABSL_FLAG(int, max_layers, sparsekv::kMaxLayers, "Largest layout.num_layers accepted");
ABSL_FLAG(int, max_heads, sparsekv::kMaxHeads,
          "Largest layout.num_kv_heads and layout.num_q_heads accepted");
ABSL_FLAG(int, max_head_dim, sparsekv::kMaxHeadDim, "Largest layout.head_dim accepted");
ABSL_FLAG(int, max_id_bytes, 128, "Longest session id and tenant name, in bytes");
ABSL_FLAG(int, max_labels, 32, "Most labels per session");
ABSL_FLAG(int, max_label_key_bytes, 64, "Longest label key, in bytes");
ABSL_FLAG(int, max_label_value_bytes, 256, "Longest label value, in bytes");
ABSL_FLAG(int, max_obs_tokens, 256,
          "Most observation queries (AppendKV obs_q tokens) per message and layer");
ABSL_FLAG(bool, reject_nonfinite, true,
          "Reject NaN/Inf in K, V and queries, and K/V values that overflow the storage dtype, "
          "with INVALID_ARGUMENT; false stores them as they round (decode steps over them are "
          "then non-finite)");
ABSL_FLAG(absl::Duration, default_ttl, absl::Hours(1),
          "Idle time after which a session that asked for no TTL is evicted");
ABSL_FLAG(absl::Duration, max_ttl, absl::Hours(24), "Largest TTL a session may ask for");
ABSL_FLAG(int, pruner_threads, 1, "Background compression threads");
ABSL_FLAG(int, decode_threads, -1,
          "Worker threads that split one decode step over KV heads and chunks; -1 = hardware "
          "threads - 1, 0 = none");
ABSL_FLAG(int, decode_spin_us, 250,
          "Microseconds the decode threads poll for the next step before sleeping (waking a "
          "sleeping thread costs ~100 us on a VM); 0 = never poll");
ABSL_FLAG(std::string, backend, "auto",
          "Where decode runs: auto (the best this build and machine offer: today the CPU), cpu, "
          "or cuda (refused until the CUDA backend holds sessions in GPU memory)");
ABSL_FLAG(absl::Duration, decode_batch_window, absl::ZeroDuration(),
          "How long the decode batcher waits after a request for others to join its backend "
          "call; 0 = none (requests that arrive while a batch runs still join the next)");
ABSL_FLAG(bool, decode_batching, true,
          "Decode steps go through the batcher (one backend call for the steps of many "
          "requests); false runs each request on its gRPC thread alone (a benchmark baseline)");
ABSL_FLAG(double, quality_shadow_fraction, 0.01,
          "Share of sessions (0..1, picked by a hash of the session id) that keep a dense "
          "shadow of their cache: their decode steps also attend densely, and the sparse "
          "output's relative error goes to sparsekv_quality_relative_error (README \"Quality "
          "metric\"); sessions with sparsity 0 never do; 0 = off");
ABSL_FLAG(int64_t, quality_shadow_max_bytes, int64_t{256} << 20,
          "Bytes all dense shadows may hold together (they count against the host budget "
          "too); a shadow that would pass it is dropped; 0 = only the budgets limit them");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(5),
          "On SIGTERM/SIGINT, how long running RPCs may take to finish");
ABSL_FLAG(std::string, snapshot_dir, "",
          "Directory of session snapshots (one file per session): restored at start before "
          "serving, written on SIGTERM/SIGINT after running calls finish; empty = off");
ABSL_FLAG(absl::Duration, checkpoint_interval, absl::ZeroDuration(),
          "With --snapshot_dir: how often sessions changed since their last write are written "
          "in the background, bounding what a crash loses; 0 = only at shutdown");
ABSL_FLAG(std::string, ready_file, "",
          "If set, written once serving: lines grpc_port=N and metrics_port=M (for scripts "
          "that start the server on port 0)");

int main(int argc, char** argv) {
  // Multi-MiB AppendKV messages come from the heap, not from a fresh mmap per message (page
  // faults on every received byte otherwise); 32 MiB is glibc's ceiling for this setting.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  // Freed heap tops shrink past 32 MiB: the heaps of gRPC threads (64 MiB each) are only ever
  // trimmed from the top this way (malloc_trim returns pages below the top), so a higher value
  // would keep what large deletions free (tests/e2e/rss_test.py).
  mallopt(M_TRIM_THRESHOLD, 32 << 20);
  absl::SetProgramUsageMessage("sparsekv-server: KV-cache compression service (gRPC)");
  absl::ParseCommandLine(argc, argv);

  // Block the stop signals in every thread (gRPC's included) and take them with sigwait below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // Over a file size limit a write fails with EFBIG, reported like a full disk, instead of
  // killing the server.
  signal(SIGXFSZ, SIG_IGN);

  sparsekv::service::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  if (options.listen.empty()) {
    // A plaintext port lets whoever reaches it read and change every session: by default
    // only this host can; serving the network is asked for (--listen) or comes with TLS.
    options.listen =
        absl::GetFlag(FLAGS_tls_cert_file).empty() ? "127.0.0.1:50051" : "0.0.0.0:50051";
  }
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  const absl::StatusOr<sparsekv::service::AuthMode> auth =
      sparsekv::service::ParseAuthMode(absl::GetFlag(FLAGS_auth));
  if (!auth.ok()) {
    std::fprintf(stderr, "sparsekv-server: %s\n", std::string(auth.status().message()).c_str());
    return 2;
  }
  options.auth = *auth;
  options.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  options.store.host_budget_bytes = absl::GetFlag(FLAGS_host_budget_bytes);
  if (options.store.host_budget_bytes < 0) {
    options.store.host_budget_bytes = sparsekv::service::AvailableMemoryBytes() / 2;
  }
  sparsekv::SessionLimits& limits = options.store.limits;
  limits.max_session_bytes = absl::GetFlag(FLAGS_max_session_bytes);
  limits.max_layers = absl::GetFlag(FLAGS_max_layers);
  limits.max_kv_heads = limits.max_q_heads = absl::GetFlag(FLAGS_max_heads);
  limits.max_head_dim = absl::GetFlag(FLAGS_max_head_dim);
  limits.max_id_bytes = absl::GetFlag(FLAGS_max_id_bytes);
  limits.max_labels = absl::GetFlag(FLAGS_max_labels);
  limits.max_label_key_bytes = absl::GetFlag(FLAGS_max_label_key_bytes);
  limits.max_label_value_bytes = absl::GetFlag(FLAGS_max_label_value_bytes);
  limits.max_obs_tokens = absl::GetFlag(FLAGS_max_obs_tokens);
  limits.reject_nonfinite = absl::GetFlag(FLAGS_reject_nonfinite);
  options.store.tenant_budget_bytes = absl::GetFlag(FLAGS_tenant_budget_bytes);
  options.store.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  options.store.max_sessions_per_tenant = absl::GetFlag(FLAGS_max_sessions_per_tenant);
  options.store.default_ttl = absl::GetFlag(FLAGS_default_ttl);
  options.store.max_ttl = absl::GetFlag(FLAGS_max_ttl);
  options.store.pruner_threads = absl::GetFlag(FLAGS_pruner_threads);
  options.store.decode_threads = absl::GetFlag(FLAGS_decode_threads);
  options.store.decode_spin_us = absl::GetFlag(FLAGS_decode_spin_us);
  options.store.decode_batch_window = absl::GetFlag(FLAGS_decode_batch_window);
  options.store.decode_batching = absl::GetFlag(FLAGS_decode_batching);
  options.store.quality.shadow_fraction = absl::GetFlag(FLAGS_quality_shadow_fraction);
  options.store.quality.shadow_max_bytes = absl::GetFlag(FLAGS_quality_shadow_max_bytes);
  if (!(options.store.quality.shadow_fraction >= 0 && options.store.quality.shadow_fraction <= 1) ||
      options.store.quality.shadow_max_bytes < 0) {
    std::fprintf(stderr,
                 "sparsekv-server: --quality_shadow_fraction must be in [0, 1] and "
                 "--quality_shadow_max_bytes >= 0\n");
    return 2;
  }
  options.backend = absl::GetFlag(FLAGS_backend);
  options.snapshot_dir = absl::GetFlag(FLAGS_snapshot_dir);
  options.checkpoint_interval = absl::GetFlag(FLAGS_checkpoint_interval);
  if (options.checkpoint_interval < absl::ZeroDuration() ||
      (options.checkpoint_interval > absl::ZeroDuration() && options.snapshot_dir.empty())) {
    std::fprintf(stderr,
                 "sparsekv-server: --checkpoint_interval needs --snapshot_dir and must "
                 "be >= 0\n");
    return 2;
  }

  auto server = sparsekv::service::Server::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "sparsekv-server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  const auto& build = (*server)->build();
  std::fprintf(stderr,
               "sparsekv-server %s (%s): kernels %s/%s; grpc listening on %s (port %d), metrics "
               "on port %d\n",
               build.version.c_str(), build.git_commit.c_str(), build.kernel_backend.c_str(),
               build.kernel_variant.c_str(), options.listen.c_str(), (*server)->grpc_port(),
               (*server)->metrics_port());
  std::fprintf(stderr, "sparsekv-server: %s\n", (*server)->store().backend().features().c_str());
  std::fprintf(stderr, "sparsekv-server: host budget %lld bytes%s\n",
               static_cast<long long>(options.store.host_budget_bytes),
               options.store.host_budget_bytes == 0 ? " (unlimited)" : "");
  std::fprintf(stderr, "sparsekv-server: gRPC port %s\n",
               options.tls_cert_file.empty()        ? "PLAINTEXT (no encryption)"
               : options.tls_client_ca_file.empty() ? "TLS"
                                                    : "mutual TLS (client certificates required)");
  if (options.auth == sparsekv::service::AuthMode::kNone) {
    std::fprintf(stderr,
                 "sparsekv-server: WARNING: --auth=none: no authentication, every client that "
                 "reaches the gRPC port can list, read, change and delete every session of every "
                 "tenant; use --auth=token beyond local development\n");
  } else {
    std::fprintf(stderr, "sparsekv-server: --auth=token: %zu tokens from %s%s\n",
                 (*server)->tokens(), options.auth_token_file.c_str(),
                 options.tls_cert_file.empty()
                     ? "; WARNING: the port is plaintext, so tokens cross the network readable"
                     : "");
  }
  const std::string ready = absl::GetFlag(FLAGS_ready_file);
  if (!ready.empty()) {
    // Write then rename so that a reader never sees a half-written file.
    const std::string tmp = ready + ".tmp";
    {
      std::ofstream f(tmp);
      f << "grpc_port=" << (*server)->grpc_port() << "\nmetrics_port=" << (*server)->metrics_port()
        << "\n";
    }
    std::rename(tmp.c_str(), ready.c_str());
  }

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "sparsekv-server: signal %d, shutting down\n", sig);
  (*server)->Shutdown(absl::GetFlag(FLAGS_shutdown_grace));
  std::fprintf(stderr, "sparsekv-server: stopped\n");
  return 0;
}
