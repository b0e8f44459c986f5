#include "service/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/pem_file.h"
#include "common/status_macros.h"

#ifndef SPARSEKV_VERSION
#define SPARSEKV_VERSION "0.0.0"
#endif
#ifndef SPARSEKV_GIT_COMMIT
#define SPARSEKV_GIT_COMMIT "unknown"
#endif

namespace sparsekv::service {

BuildInfo CurrentBuildInfo(const kernels::ComputeBackend& b) {
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

namespace {

// The gRPC port's credentials: plaintext, TLS, or mutual TLS (README "TLS").
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> GrpcCredentials(const ServerOptions& o) {
  if (o.tls_cert_file.empty() && o.tls_key_file.empty()) {
    if (!o.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca_file needs --tls_cert_file and --tls_key_file");
    }
    return grpc::InsecureServerCredentials();
  }
  if (o.tls_cert_file.empty() || o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together");
  }
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  SPARSEKV_ASSIGN_OR_RETURN(pair.cert_chain, ReadPemFile(o.tls_cert_file, "--tls_cert_file"));
  SPARSEKV_ASSIGN_OR_RETURN(pair.private_key, ReadPemFile(o.tls_key_file, "--tls_key_file"));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!o.tls_client_ca_file.empty()) {
    SPARSEKV_ASSIGN_OR_RETURN(ssl.pem_root_certs,
                              ReadPemFile(o.tls_client_ca_file, "--tls_client_ca_file"));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(ServerOptions options) {
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                            GrpcCredentials(options));
  if (options.max_message_bytes < 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be >= 1024, got ", options.max_message_bytes));
  }
  if (!options.store.backend) {
    std::string why;
    SPARSEKV_ASSIGN_OR_RETURN(options.store.backend,
                              CreateBackend(options.backend, options.store, &why));
    std::fprintf(stderr, "sparsekv-server: %s\n", why.c_str());
  }
  std::unique_ptr<Server> s(new Server());
  s->store_ = std::make_unique<SessionStore>(options.store);
  s->build_ = CurrentBuildInfo(s->store_->backend());
  s->metrics_ = std::make_unique<Metrics>(s->store_.get(), s->build_);
  SPARSEKV_ASSIGN_OR_RETURN(
      s->auth_, Authenticator::Create(options.auth, options.auth_token_file, s->metrics_.get()));
  if (!options.snapshot_dir.empty()) {
    // Before serving: no client can create a session under a restored session's id first.
    s->snapshots_ = std::make_unique<SnapshotDir>(options.snapshot_dir);
    const RestoreReport report = s->snapshots_->Restore(s->store_.get());
    s->metrics_->RecordSnapshotRestore(report.restored,
                                       static_cast<int64_t>(report.skipped.size()));
    std::fprintf(stderr, "sparsekv-server: snapshots in %s: %s\n", options.snapshot_dir.c_str(),
                 report.ToString().c_str());
  }
  ServiceLimits limits;
  limits.max_message_bytes = options.max_message_bytes;
  s->service_ = std::make_unique<KvCacheServiceImpl>(s->store_.get(), s->metrics_.get(), s->build_,
                                                     limits, s->auth_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &s->grpc_port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(s->service_.get());
  s->grpc_server_ = builder.BuildAndStart();
  if (!s->grpc_server_ || s->grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", options.listen,
        " (malformed address, port in use, or a TLS certificate and key that do not load)"));
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
  s->serving_ = true;
  if (s->snapshots_ && options.checkpoint_interval > absl::ZeroDuration()) {
    Server* raw = s.get();
    s->checkpointer_ = std::thread(
        [raw, interval = options.checkpoint_interval] { raw->CheckpointLoop(interval); });
  }
  return s;
}

void Server::CheckpointLoop(absl::Duration interval) {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(checkpoint_mu_);
      checkpoint_cv_.wait_for(lock, absl::ToChronoNanoseconds(interval),
                              [this] { return stop_checkpoints_; });
      if (stop_checkpoints_) return;
    }
    WriteSnapshots("checkpoint");
  }
}

void Server::WriteSnapshots(const char* why) {
  const WriteReport r = snapshots_->Write(*store_);
  metrics_->RecordSnapshotWrite(r.written, r.failed, r.duration);
  const bool shutdown = std::string_view(why) == "shutdown";
  const absl::Time now = absl::Now();
  // A full disk fails every pass: say so when it starts, then once a minute, not every pass.
  bool log = shutdown;
  if (r.failed > 0 && (!last_write_failed_ || now - last_failure_log_ >= absl::Minutes(1))) {
    log = true;
    last_failure_log_ = now;
  }
  if (r.failed == 0 && last_write_failed_) log = true;  // recovered
  last_write_failed_ = r.failed > 0;
  if (log) {
    std::fprintf(stderr, "sparsekv-server: %s to %s: %s\n", why, snapshots_->dir().c_str(),
                 r.ToString().c_str());
  }
}

void Server::Shutdown(absl::Duration grace) {
  if (shut_down_) return;
  shut_down_ = true;
  service_->BeginShutdown();
  grpc_server_->GetHealthCheckService()->SetServingStatus(false);
  grpc_server_->Shutdown(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(absl::ToInt64Milliseconds(grace)));
  grpc_server_->Wait();
  if (checkpointer_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(checkpoint_mu_);
      stop_checkpoints_ = true;
    }
    checkpoint_cv_.notify_all();
    checkpointer_.join();
  }
  // No call runs any more: this write is the exact set of sessions.
  if (snapshots_ && serving_) WriteSnapshots("shutdown");
  exposer_.reset();
}

Server::~Server() {
  if (grpc_server_) Shutdown(absl::Seconds(1));
}

}  // namespace sparsekv::service
