// Assembles the sparsekv server: session store, gRPC service (+ health and reflection) and the
// Prometheus exposer. Used by main.cc and by in-process tests.
//
// Thread-compatible: Start once, then Shutdown once from any thread.
#ifndef SPARSEKV_SERVICE_SERVER_H_
#define SPARSEKV_SERVICE_SERVER_H_

#include <grpcpp/grpcpp.h>
#include <prometheus/exposer.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/session_store.h"
#include "service/kv_cache_service.h"
#include "service/metrics.h"

namespace sparsekv::service {

struct ServerOptions {
  std::string listen = "0.0.0.0:50051";         // gRPC; port 0 picks a free port
  std::string metrics_listen = "0.0.0.0:9464";  // HTTP /metrics; empty = no exposer
  int max_message_bytes = 64 << 20;             // gRPC receive limit per message
  SessionStoreOptions store;
};

// Memory this process may use: the smaller of physical memory and the cgroup (v2 or v1)
// limit, in bytes.
int64_t AvailableMemoryBytes();

class Server {
 public:
  // Binds both ports and starts serving. InvalidArgument for a malformed address,
  // Unavailable when a port cannot be bound.
  static absl::StatusOr<std::unique_ptr<Server>> Start(ServerOptions options);
  ~Server();  // Shutdown() if not done yet

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }  // 0 without exposer
  const BuildInfo& build() const { return build_; }
  Metrics& metrics() { return *metrics_; }
  SessionStore& store() { return *store_; }

  // Stops accepting RPCs, lets running ones finish for up to `grace`, cancels the rest.
  void Shutdown(absl::Duration grace);

 private:
  Server() = default;

  BuildInfo build_;
  std::unique_ptr<SessionStore> store_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<KvCacheServiceImpl> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  bool shut_down_ = false;
};

// Version, git commit and the CPU kernel variant of this build.
// Version, commit and the kernels `backend` runs.
BuildInfo CurrentBuildInfo(const kernels::Backend& backend);

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_SERVER_H_
