// The gRPC KvCacheService on the callback API. Every unary handler has the same thin shape:
// parse the request bytes -> check shutdown/deadline -> convert and validate the request ->
// call core/ -> convert the status -> record metrics. Streams use small self-owning reactors.
// Handlers take raw bytes (service/wire.h) so that unparseable requests and stream messages
// get a status that says so.
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

// The generated service with every method taking request/response bytes.
using RawKvCacheService = v1::KvCacheService::WithRawCallbackMethod_CreateSession<
    v1::KvCacheService::WithRawCallbackMethod_GetSession<
        v1::KvCacheService::WithRawCallbackMethod_ListSessions<
            v1::KvCacheService::WithRawCallbackMethod_DeleteSession<
                v1::KvCacheService::WithRawCallbackMethod_AppendKV<
                    v1::KvCacheService::WithRawCallbackMethod_Decode<
                        v1::KvCacheService::WithRawCallbackMethod_DecodeStream<
                            v1::KvCacheService::WithRawCallbackMethod_Flush<
                                v1::KvCacheService::WithRawCallbackMethod_ReadKV<
                                    v1::KvCacheService::WithRawCallbackMethod_ExportSession<
                                        v1::KvCacheService::WithRawCallbackMethod_ImportSession<
                                            v1::KvCacheService::WithRawCallbackMethod_GetServerInfo<
                                                v1::KvCacheService::Service>>>>>>>>>>>>;

struct ServiceLimits {
  // Largest message accepted and sent (reported by GetServerInfo); ReadKV and ListSessions
  // size their responses under it.
  int64_t max_message_bytes = 64 << 20;
  // Largest K+V payload per ReadKV response message; stays under gRPC's default 4 MiB client
  // receive limit so that clients need no special channel settings.
  int64_t read_chunk_bytes = 2 << 20;
  // Threads for calls that may block (Flush), kept off gRPC's callback threads.
  int blocking_threads = 2;
};

class KvCacheServiceImpl final : public RawKvCacheService {
 public:
  // `store` and `metrics` must outlive the service.
  KvCacheServiceImpl(SessionStore* store, Metrics* metrics, BuildInfo build, ServiceLimits limits);
  // Waits for blocking calls in progress.
  ~KvCacheServiceImpl() override;

  // From now on new requests get UNAVAILABLE; running ones finish.
  void BeginShutdown() { shutting_down_.store(true); }

  using Bytes = grpc::ByteBuffer;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx, const Bytes* req,
                                          Bytes* resp) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx, const Bytes* req,
                                       Bytes* resp) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx, const Bytes* req,
                                         Bytes* resp) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* ctx, const Bytes* req,
                                          Bytes* resp) override;
  grpc::ServerReadReactor<Bytes>* AppendKV(grpc::CallbackServerContext* ctx, Bytes* resp) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* ctx, const Bytes* req,
                                   Bytes* resp) override;
  grpc::ServerBidiReactor<Bytes, Bytes>* DecodeStream(grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* Flush(grpc::CallbackServerContext* ctx, const Bytes* req,
                                  Bytes* resp) override;
  grpc::ServerWriteReactor<Bytes>* ReadKV(grpc::CallbackServerContext* ctx,
                                          const Bytes* req) override;
  grpc::ServerWriteReactor<Bytes>* ExportSession(grpc::CallbackServerContext* ctx,
                                                 const Bytes* req) override;
  grpc::ServerReadReactor<Bytes>* ImportSession(grpc::CallbackServerContext* ctx,
                                                Bytes* resp) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx, const Bytes* req,
                                          Bytes* resp) override;

  // Runs one decode request (unary or one stream message). Public for the stream reactor.
  absl::Status RunDecode(const v1::DecodeRequest& req, v1::DecodeResponse* resp);
  // Applies one AppendKV message, all or nothing; `cancel` may abandon it before it is
  // applied. Returns the token rows appended.
  absl::StatusOr<int64_t> RunAppend(const v1::AppendKVRequest& req, std::string* session_id,
                                    const CancelCheck& cancel);
  // UNAVAILABLE while shutting down.
  absl::Status CheckServing() const;

  SessionStore* store() { return store_; }
  Metrics* metrics() { return metrics_; }
  const ServiceLimits& limits() const { return limits_; }

 private:
  // Parses `req` as Request, runs `body(request, &response)`, serializes the response into
  // `resp` on success and finishes the call with the status, recording metrics.
  template <typename Request, typename Response, typename Body>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const char* method,
                                  const Bytes* req, Bytes* resp, Body body);
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
