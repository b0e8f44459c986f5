#include "service/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"

#ifndef SPARSEKV_VERSION
#define SPARSEKV_VERSION "0.0.0"
#endif
#ifndef SPARSEKV_GIT_COMMIT
#define SPARSEKV_GIT_COMMIT "unknown"
#endif

namespace sparsekv::service {

BuildInfo CurrentBuildInfo(const kernels::Backend& b) {
  return BuildInfo{SPARSEKV_VERSION, SPARSEKV_GIT_COMMIT, b.name(), b.variant()};
}

int64_t AvailableMemoryBytes() {
  int64_t bytes = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream f(path);
    long long limit = 0;
    if (f >> limit && limit > 0) bytes = std::min<int64_t>(bytes, limit);  // "max" fails >>
  }
  return bytes;
}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(ServerOptions options) {
  if (options.max_message_bytes < 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be >= 1024, got ", options.max_message_bytes));
  }
  std::unique_ptr<Server> s(new Server());
  s->store_ = std::make_unique<SessionStore>(options.store);
  s->build_ = CurrentBuildInfo(s->store_->backend());
  s->metrics_ = std::make_unique<Metrics>(s->store_.get(), s->build_);
  ServiceLimits limits;
  limits.max_message_bytes = options.max_message_bytes;
  s->service_ =
      std::make_unique<KvCacheServiceImpl>(s->store_.get(), s->metrics_.get(), s->build_, limits);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &s->grpc_port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(s->service_.get());
  s->grpc_server_ = builder.BuildAndStart();
  if (!s->grpc_server_ || s->grpc_port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen, " (malformed address or port in use)"));
  }

  if (!options.metrics_listen.empty()) {
    // prometheus-cpp (civetweb) throws when the port is taken: stop it at this boundary.
    try {
      // civetweb's defaults let a client that sends half a request hold one of two threads for
      // 30 s, so two such connections stop every scrape: more threads, a short read timeout.
      s->exposer_ = std::make_unique<prometheus::Exposer>(
          std::vector<std::string>{"listening_ports", options.metrics_listen, "num_threads", "8",
                                   "request_timeout_ms", "2000"});
    } catch (const std::exception& e) {
      s->grpc_server_->Shutdown();
      return absl::UnavailableError(
          absl::StrCat("cannot serve metrics on ", options.metrics_listen, ": ", e.what()));
    }
    for (const auto& c : s->metrics_->collectables()) s->exposer_->RegisterCollectable(c);
    const std::vector<int> ports = s->exposer_->GetListeningPorts();
    s->metrics_port_ = ports.empty() ? 0 : ports.front();
  }
  return s;
}

void Server::Shutdown(absl::Duration grace) {
  if (shut_down_) return;
  shut_down_ = true;
  service_->BeginShutdown();
  grpc_server_->GetHealthCheckService()->SetServingStatus(false);
  grpc_server_->Shutdown(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(absl::ToInt64Milliseconds(grace)));
  grpc_server_->Wait();
  exposer_.reset();
}

Server::~Server() {
  if (grpc_server_) Shutdown(absl::Seconds(1));
}

}  // namespace sparsekv::service
