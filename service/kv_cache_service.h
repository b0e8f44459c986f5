// The gRPC KvCacheService on the callback API: the transport around service/handlers.h. Every
// unary method has the same thin shape: parse the request bytes -> the handler (with the call's
// deadline and cancellation as its CancelCheck) -> serialize -> convert the status -> record
// metrics. Streams use small self-owning reactors around the handlers' call objects. Methods
// take raw bytes (service/wire.h) so that unparseable requests and stream messages get a
// status that says so. Every call first resolves its Caller from the `authorization` metadata
// (service/auth.h); a call without a valid token ends UNAUTHENTICATED before its request is
// read. gRPC health and reflection are separate services and need no token.
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
#include "service/auth.h"
#include "service/handlers.h"
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

class KvCacheServiceImpl final : public RawKvCacheService {
 public:
  // `store`, `metrics` and `auth` must outlive the service; a null `auth` lets every call in
  // as Caller::NoAuth() (--auth=none).
  KvCacheServiceImpl(SessionStore* store, Metrics* metrics, BuildInfo build, ServiceLimits limits,
                     const Authenticator* auth = nullptr);
  // Waits for blocking calls in progress.
  ~KvCacheServiceImpl() override;

  // From now on new requests get UNAVAILABLE; running ones finish.
  void BeginShutdown() { handlers_.BeginShutdown(); }

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

  Handlers& handlers() { return handlers_; }
  Metrics* metrics() { return handlers_.metrics(); }

 private:
  // The caller of the call `ctx` (once per call): UNAUTHENTICATED without a known token.
  absl::StatusOr<Caller> Authenticate(const grpc::CallbackServerContext* ctx) const;
  // Parses `req` as Request, runs `body(caller, request, &response)`, serializes the response
  // into `resp` on success and finishes the call with the status, recording metrics.
  template <typename Request, typename Response, typename Body>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const char* method,
                                  const Bytes* req, Bytes* resp, Body body);
  // Finishes a unary call with `status`, recording metrics.
  grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, const char* method,
                                        absl::Time start, const absl::Status& status);

  Handlers handlers_;
  const Authenticator* const auth_;
  std::unique_ptr<BoundedExecutor> blocking_;
};

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_KV_CACHE_SERVICE_H_
