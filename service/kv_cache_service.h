// The gRPC KvCacheService on the callback API. Every unary handler has the same thin shape:
// check shutdown/deadline -> convert and validate the request -> call core/ -> convert the
// status -> record metrics. Streams use small self-owning reactors.
//
// Thread-safe: gRPC calls handlers concurrently from its own threads.
#ifndef SPARSEKV_SERVICE_KV_CACHE_SERVICE_H_
#define SPARSEKV_SERVICE_KV_CACHE_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/executor.h"
#include "core/session_store.h"
#include "service/metrics.h"
#include "sparsekv/v1/kv_cache.grpc.pb.h"

namespace sparsekv::service {

struct ServiceLimits {
  int64_t max_message_bytes = 64 << 20;  // reported by GetServerInfo
  // Largest K+V payload per ReadKV response message; stays under gRPC's default 4 MiB client
  // receive limit so that clients need no special channel settings.
  int64_t read_chunk_bytes = 2 << 20;
  // Threads for calls that may block (Flush), kept off gRPC's callback threads.
  int blocking_threads = 2;
};

class KvCacheServiceImpl final : public v1::KvCacheService::CallbackService {
 public:
  // `store` and `metrics` must outlive the service.
  KvCacheServiceImpl(SessionStore* store, Metrics* metrics, BuildInfo build, ServiceLimits limits);
  // Waits for blocking calls in progress.
  ~KvCacheServiceImpl() override;

  // From now on new requests get UNAVAILABLE; running ones finish.
  void BeginShutdown() { shutting_down_.store(true); }

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx,
                                          const v1::CreateSessionRequest* req,
                                          v1::Session* resp) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx,
                                       const v1::GetSessionRequest* req,
                                       v1::Session* resp) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const v1::ListSessionsRequest* req,
                                         v1::ListSessionsResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* ctx,
                                          const v1::DeleteSessionRequest* req,
                                          v1::DeleteSessionResponse* resp) override;
  grpc::ServerReadReactor<v1::AppendKVRequest>* AppendKV(grpc::CallbackServerContext* ctx,
                                                         v1::AppendKVResponse* resp) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* ctx, const v1::DecodeRequest* req,
                                   v1::DecodeResponse* resp) override;
  grpc::ServerBidiReactor<v1::DecodeRequest, v1::DecodeResponse>* DecodeStream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* Flush(grpc::CallbackServerContext* ctx, const v1::FlushRequest* req,
                                  v1::FlushResponse* resp) override;
  grpc::ServerWriteReactor<v1::ReadKVResponse>* ReadKV(grpc::CallbackServerContext* ctx,
                                                       const v1::ReadKVRequest* req) override;
  grpc::ServerWriteReactor<v1::SessionChunk>* ExportSession(
      grpc::CallbackServerContext* ctx, const v1::ExportSessionRequest* req) override;
  grpc::ServerReadReactor<v1::SessionChunk>* ImportSession(grpc::CallbackServerContext* ctx,
                                                           v1::Session* resp) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* req,
                                          v1::ServerInfo* resp) override;

  // Runs one decode request (unary or one stream message). Public for the stream reactor.
  absl::Status RunDecode(const v1::DecodeRequest& req, v1::DecodeResponse* resp);
  // Applies one AppendKV message; returns the token rows appended.
  absl::StatusOr<int64_t> RunAppend(const v1::AppendKVRequest& req, std::string* session_id);
  // UNAVAILABLE while shutting down.
  absl::Status CheckServing() const;

  SessionStore* store() { return store_; }
  Metrics* metrics() { return metrics_; }
  const ServiceLimits& limits() const { return limits_; }

 private:
  // Finishes a unary call with `status`, recording metrics.
  grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, const char* method,
                                        absl::Time start, const absl::Status& status);

  SessionStore* const store_;
  Metrics* const metrics_;
  const BuildInfo build_;
  const ServiceLimits limits_;
  std::atomic<bool> shutting_down_{false};
  std::unique_ptr<BoundedExecutor> blocking_;
};

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_KV_CACHE_SERVICE_H_
