// Assembles the sparsekv server: session store, gRPC service (+ health and reflection), the
// Prometheus exposer, and with a snapshot directory the restore at start, periodic
// checkpoints and the write at shutdown. Used by main.cc and by in-process tests.
//
// Thread-compatible: Start once, then Shutdown once from any thread.
#ifndef SPARSEKV_SERVICE_SERVER_H_
#define SPARSEKV_SERVICE_SERVER_H_

#include <grpcpp/grpcpp.h>
#include <prometheus/exposer.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/session_store.h"
#include "core/snapshot_dir.h"
#include "service/auth.h"
#include "service/kv_cache_service.h"
#include "service/metrics.h"

namespace sparsekv::service {

struct ServerOptions {
  std::string listen = "0.0.0.0:50051";         // gRPC; port 0 picks a free port
  std::string metrics_listen = "0.0.0.0:9464";  // HTTP /metrics; empty = no exposer
  int max_message_bytes = 64 << 20;             // gRPC receive limit per message
  // TLS on the gRPC port: PEM files of the server's certificate chain and key (both or
  // neither; neither = plaintext), and of the CAs whose client certificates it requires
  // (mutual TLS; empty = no client certificate asked for). Read once at start.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Where decode runs: auto | cpu | cuda (core CreateBackend), unless store.backend is set.
  std::string backend = "auto";
  // Who may call (service/auth.h): kNone lets everyone use every session; kToken requires a
  // bearer token of `auth_token_file` on every call but health and reflection.
  AuthMode auth = AuthMode::kNone;
  std::string auth_token_file;
  SessionStoreOptions store;
  // Sessions are restored from here before serving and written here at Shutdown (README
  // "Restart without loss"); empty = neither.
  std::string snapshot_dir;
  // With snapshot_dir: how often a background thread writes the sessions changed since their
  // last write; zero = only at Shutdown.
  absl::Duration checkpoint_interval = absl::ZeroDuration();
};

// Memory this process may use: the smaller of physical memory and the cgroup (v2 or v1)
// limit, in bytes.
int64_t AvailableMemoryBytes();

class Server {
 public:
  // Restores the sessions of options.snapshot_dir (one line on stderr: restored and skipped
  // files, and why; never fatal), then binds both ports and starts serving. InvalidArgument
  // for a malformed address or TLS files that are missing, unreadable or half given,
  // Unavailable when a port cannot be bound (or the certificate and key do not load);
  // InvalidArgument for auth options that do not go together or a bad token file;
  // InvalidArgument / Unavailable for a backend that cannot be made (an unknown name, cuda
  // without a CUDA backend).
  static absl::StatusOr<std::unique_ptr<Server>> Start(ServerOptions options);
  ~Server();  // Shutdown() if not done yet

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }  // 0 without exposer
  const BuildInfo& build() const { return build_; }
  Metrics& metrics() { return *metrics_; }
  SessionStore& store() { return *store_; }
  // Tokens of the auth table in force (0 with --auth=none).
  size_t tokens() const { return auth_->tokens(); }

  // Stops accepting RPCs, lets running ones finish for up to `grace`, cancels the rest, then
  // writes every session to the snapshot directory (if any; errors are reported on stderr and
  // in metrics, never fatal).
  void Shutdown(absl::Duration grace);

 private:
  Server() = default;

  // One pass of SnapshotDir::Write, counted in metrics; `why` names it in log lines. Failures
  // are logged always at shutdown, else when they start and then at most once a minute.
  void WriteSnapshots(const char* why);
  void CheckpointLoop(absl::Duration interval);

  BuildInfo build_;
  std::unique_ptr<SessionStore> store_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Authenticator> auth_;  // outlives service_, which reads it
  std::unique_ptr<KvCacheServiceImpl> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  bool shut_down_ = false;
  bool serving_ = false;  // Start succeeded: the snapshot directory is ours to write

  std::unique_ptr<SnapshotDir> snapshots_;
  std::thread checkpointer_;
  std::mutex checkpoint_mu_;
  std::condition_variable checkpoint_cv_;
  bool stop_checkpoints_ = false;  // guarded by checkpoint_mu_
  // Used by WriteSnapshots only: on the checkpoint thread, then at Shutdown after joining it.
  bool last_write_failed_ = false;
  absl::Time last_failure_log_ = absl::InfinitePast();
};

// Version, git commit and the CPU kernel variant of this build.
// Version, commit and the kernels `backend` runs.
BuildInfo CurrentBuildInfo(const kernels::ComputeBackend& backend);

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_SERVER_H_
