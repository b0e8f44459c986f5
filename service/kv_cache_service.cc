#include "service/kv_cache_service.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "service/convert.h"
#include "service/grpc_status.h"
#include "service/wire.h"

namespace sparsekv::service {
namespace {

absl::Status CheckDeadline(const grpc::CallbackServerContext* ctx) {
  if (ctx->deadline() < std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError("deadline expired before the request was applied");
  }
  return absl::OkStatus();
}

// What long request work asks between its parts: stop when the client is gone or its
// deadline has passed (nothing of the request is applied then).
CancelCheck CallCancelCheck(grpc::CallbackServerContext* ctx) {
  return [ctx]() -> absl::Status {
    if (ctx->IsCancelled()) return absl::CancelledError("the call was cancelled");
    return CheckDeadline(ctx);
  };
}

// What every streaming reactor of this service shares: it finishes with an absl::Status and,
// when done, records the call under `method` (a cancelled or broken call as CANCELLED).
// `Base` is a ServerReadReactor or ServerWriteReactor of ByteBuffer.
template <typename Base>
class RecordedReactor : public Base {
 public:
  RecordedReactor(Metrics* metrics, const char* method, absl::Time start = absl::Now())
      : metrics_(metrics), method_(method), start_(start) {}

  void OnCancel() override { cancelled_ = true; }
  void OnDone() override {
    metrics_->RecordRpc(method_, cancelled_ ? grpc::StatusCode::CANCELLED : status_.error_code(),
                        absl::Now() - start_);
    delete this;
  }

 protected:
  void FinishWith(const absl::Status& st) {
    status_ = ToGrpcStatus(st);
    this->Finish(status_);
  }

 private:
  Metrics* const metrics_;
  const char* const method_;
  const absl::Time start_;
  grpc::Status status_;
  std::atomic<bool> cancelled_{false};
};

// A server stream that writes one message at a time: WriteNext() starts the next write or
// finishes the call; a write the client does not take ends it.
class StreamWriter : public RecordedReactor<grpc::ServerWriteReactor<grpc::ByteBuffer>> {
 public:
  using RecordedReactor::RecordedReactor;

  void OnWriteDone(bool ok) override {
    if (!ok) {
      FinishWith(absl::UnavailableError("client stopped reading"));
      return;
    }
    WriteNext();
  }

 protected:
  virtual void WriteNext() = 0;
};

// Finishes a streaming call at once with a status (requests rejected before the first
// message).
template <typename Base>
class FinishNow final : public RecordedReactor<Base> {
 public:
  FinishNow(Metrics* metrics, const char* method, absl::Time start, const absl::Status& status)
      : RecordedReactor<Base>(metrics, method, start) {
    this->FinishWith(status);
  }
};

// AppendKV: applies each message as it arrives (AppendCall); the first error ends the call.
class AppendReactor final : public RecordedReactor<grpc::ServerReadReactor<grpc::ByteBuffer>> {
 public:
  AppendReactor(Handlers* h, Caller caller, grpc::CallbackServerContext* ctx,
                grpc::ByteBuffer* resp, absl::Time start)
      : RecordedReactor(h->metrics(), "AppendKV", start),
        call_(h, std::move(caller)),
        ctx_(ctx),
        resp_bytes_(resp) {
    StartRead(&buf_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // client finished sending, or the call broke (then OnCancel ran or will run)
      v1::AppendKVResponse out;
      absl::Status st = call_.Finish(&out);
      if (st.ok()) SerializeMessage(out, resp_bytes_);
      FinishWith(st);
      return;
    }
    const absl::Status parsed = ParseMessage(buf_, &req_, StreamMessage(call_.messages()));
    const absl::Status st = call_.Take(parsed, req_, CallCancelCheck(ctx_));
    if (!st.ok()) {
      FinishWith(st);
      return;
    }
    StartRead(&buf_);
  }

 private:
  AppendCall call_;
  grpc::CallbackServerContext* ctx_;
  grpc::ByteBuffer* resp_bytes_;
  grpc::ByteBuffer buf_;
  v1::AppendKVRequest req_;
};

// DecodeStream: read a request, hand it to the decode batcher, write its answer, then read
// the next. A request that fails validation gets an error response and the stream goes on; a
// message that does not parse (no request id can be answered), shutdown or a broken call ends
// it.
class DecodeStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  DecodeStreamReactor(Handlers* h, Caller caller) : h_(h), caller_(std::move(caller)) {
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    const absl::Time t0 = absl::Now();
    absl::Status st = ParseMessage(in_, &req_, StreamMessage(answered_));
    if (!st.ok()) {
      h_->metrics()->RecordRpc("DecodeStream", ToGrpcStatus(st).error_code(), absl::Now() - t0);
      Finish(ToGrpcStatus(Handlers::DecodeStreamBroken(st, answered_)));
      return;
    }
    resp_.Clear();
    // Answered from the decode batcher's thread; the next read starts after the write.
    h_->DecodeAsync(caller_, req_, nullptr, &resp_, [this, t0](const absl::Status& st) {
      Handlers::AnswerStreamMessage(req_, st, &resp_);
      // Each message is accounted like a unary call, so rates and latencies compare.
      h_->metrics()->RecordRpc("DecodeStream", ToGrpcStatus(st).error_code(), absl::Now() - t0);
      ++answered_;
      SerializeMessage(resp_, &out_);
      StartWrite(&out_);
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "write failed"));
      return;
    }
    StartRead(&in_);
  }

  void OnDone() override { delete this; }

 private:
  Handlers* const h_;
  const Caller caller_;
  grpc::ByteBuffer in_, out_;
  v1::DecodeRequest req_;
  v1::DecodeResponse resp_;
  int64_t answered_ = 0;
};

// ReadKV and ExportSession: the call object's messages, one write at a time.
template <typename Call, typename Message>
class CallWriter final : public StreamWriter {
 public:
  CallWriter(Metrics* metrics, const char* method, absl::Time start, std::unique_ptr<Call> call)
      : StreamWriter(metrics, method, start), call_(std::move(call)) {
    WriteNext();
  }

 private:
  void WriteNext() override {
    absl::Status st;
    if (!call_->Next(&msg_, &st)) {
      FinishWith(st);
      return;
    }
    SerializeMessage(msg_, &out_);
    StartWrite(&out_);
  }

  std::unique_ptr<Call> call_;
  Message msg_;
  grpc::ByteBuffer out_;
};

// ImportSession: gathers the pieces (ImportCall), adds the session after the last one.
class ImportReactor final : public RecordedReactor<grpc::ServerReadReactor<grpc::ByteBuffer>> {
 public:
  ImportReactor(Handlers* h, Caller caller, grpc::ByteBuffer* resp, absl::Time start)
      : RecordedReactor(h->metrics(), "ImportSession", start),
        call_(h, std::move(caller)),
        resp_(resp) {
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      FinishWith(call_.EndedEarly());
      return;
    }
    const absl::Status parsed = ParseMessage(in_, &msg_, StreamMessage(call_.pieces()));
    absl::Status st = call_.Take(parsed, msg_);
    if (!st.ok()) {
      FinishWith(st);
      return;
    }
    if (!call_.complete()) {
      StartRead(&in_);
      return;
    }
    v1::Session out;
    st = call_.Finish(&out);
    if (st.ok()) SerializeMessage(out, resp_);
    FinishWith(st);
  }

 private:
  ImportCall call_;
  grpc::ByteBuffer* resp_;
  grpc::ByteBuffer in_;
  v1::SessionChunk msg_;
};

}  // namespace

KvCacheServiceImpl::KvCacheServiceImpl(SessionStore* store, Metrics* metrics, BuildInfo build,
                                       ServiceLimits limits, const Authenticator* auth)
    : handlers_(store, metrics, std::move(build), limits),
      auth_(auth),
      blocking_(std::make_unique<BoundedExecutor>(limits.blocking_threads, 1024)) {}

KvCacheServiceImpl::~KvCacheServiceImpl() { blocking_->Shutdown(); }

grpc::ServerUnaryReactor* KvCacheServiceImpl::FinishUnary(grpc::CallbackServerContext* ctx,
                                                          const char* method, absl::Time start,
                                                          const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const grpc::Status g = ToGrpcStatus(status);
  metrics()->RecordRpc(method, g.error_code(), absl::Now() - start);
  reactor->Finish(g);
  return reactor;
}

absl::StatusOr<Caller> KvCacheServiceImpl::Authenticate(
    const grpc::CallbackServerContext* ctx) const {
  if (auth_ == nullptr) return Caller::NoAuth();
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return auth_->Authenticate(std::nullopt);
  return auth_->Authenticate(absl::string_view(it->second.data(), it->second.size()));
}

template <typename Request, typename Response, typename Body>
grpc::ServerUnaryReactor* KvCacheServiceImpl::Unary(grpc::CallbackServerContext* ctx,
                                                    const char* method, const Bytes* req,
                                                    Bytes* resp, Body body) {
  const absl::Time start = absl::Now();
  Request request;
  Response response;
  absl::StatusOr<Caller> caller = Authenticate(ctx);
  absl::Status st = caller.status();
  if (st.ok()) st = ParseMessage(*req, &request, "");
  if (st.ok()) st = body(*caller, request, &response);
  if (st.ok()) SerializeMessage(response, resp);
  return FinishUnary(ctx, method, start, st);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::CreateSession(grpc::CallbackServerContext* ctx,
                                                            const Bytes* req, Bytes* resp) {
  return Unary<v1::CreateSessionRequest, v1::Session>(
      ctx, "CreateSession", req, resp, [&](const Caller& c, const auto& r, auto* out) {
        return handlers_.CreateSession(c, r, CallCancelCheck(ctx), out);
      });
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::GetSession(grpc::CallbackServerContext* ctx,
                                                         const Bytes* req, Bytes* resp) {
  return Unary<v1::GetSessionRequest, v1::Session>(
      ctx, "GetSession", req, resp,
      [&](const Caller& c, const auto& r, auto* out) { return handlers_.GetSession(c, r, out); });
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::ListSessions(grpc::CallbackServerContext* ctx,
                                                           const Bytes* req, Bytes* resp) {
  return Unary<v1::ListSessionsRequest, v1::ListSessionsResponse>(
      ctx, "ListSessions", req, resp,
      [&](const Caller& c, const auto& r, auto* out) { return handlers_.ListSessions(c, r, out); });
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::DeleteSession(grpc::CallbackServerContext* ctx,
                                                            const Bytes* req, Bytes* resp) {
  return Unary<v1::DeleteSessionRequest, v1::DeleteSessionResponse>(
      ctx, "DeleteSession", req, resp, [&](const Caller& c, const auto& r, auto* out) {
        return handlers_.DeleteSession(c, r, out);
      });
}

grpc::ServerReadReactor<grpc::ByteBuffer>* KvCacheServiceImpl::AppendKV(
    grpc::CallbackServerContext* ctx, Bytes* resp) {
  const absl::Time start = absl::Now();
  absl::StatusOr<Caller> caller = Authenticate(ctx);
  if (!caller.ok()) {
    return new FinishNow<grpc::ServerReadReactor<Bytes>>(metrics(), "AppendKV", start,
                                                         caller.status());
  }
  return new AppendReactor(&handlers_, *std::move(caller), ctx, resp, start);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::Decode(grpc::CallbackServerContext* ctx,
                                                     const Bytes* req, Bytes* resp) {
  const absl::Time start = absl::Now();
  // The request and its answer live until the batcher has answered (the items point into the
  // request's bytes).
  struct Call {
    v1::DecodeRequest request;
    v1::DecodeResponse response;
  };
  absl::StatusOr<Caller> caller = Authenticate(ctx);
  if (!caller.ok()) return FinishUnary(ctx, "Decode", start, caller.status());
  auto call = std::make_unique<Call>();
  const absl::Status parsed = ParseMessage(*req, &call->request, "");
  if (!parsed.ok()) return FinishUnary(ctx, "Decode", start, parsed);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  Call* c = call.release();
  handlers_.DecodeAsync(*caller, c->request, CallCancelCheck(ctx), &c->response,
                        [this, c, reactor, resp, start](const absl::Status& st) {
                          if (st.ok()) SerializeMessage(c->response, resp);
                          delete c;
                          const grpc::Status g = ToGrpcStatus(st);
                          metrics()->RecordRpc("Decode", g.error_code(), absl::Now() - start);
                          reactor->Finish(g);
                        });
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* KvCacheServiceImpl::DecodeStream(
    grpc::CallbackServerContext* ctx) {
  const absl::Time start = absl::Now();
  absl::StatusOr<Caller> caller = Authenticate(ctx);
  if (!caller.ok()) {
    return new FinishNow<grpc::ServerBidiReactor<Bytes, Bytes>>(metrics(), "DecodeStream", start,
                                                                caller.status());
  }
  return new DecodeStreamReactor(&handlers_, *std::move(caller));
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::Flush(grpc::CallbackServerContext* ctx,
                                                    const Bytes* req, Bytes* resp) {
  const absl::Time start = absl::Now();
  v1::FlushRequest request;
  absl::StatusOr<std::shared_ptr<Session>> session =
      [&]() -> absl::StatusOr<std::shared_ptr<Session>> {
    SPARSEKV_ASSIGN_OR_RETURN(const Caller caller, Authenticate(ctx));
    SPARSEKV_RETURN_IF_ERROR(ParseMessage(*req, &request, ""));
    return handlers_.FlushTarget(caller, request, CallCancelCheck(ctx));
  }();
  if (!session.ok()) return FinishUnary(ctx, "Flush", start, session.status());
  // Flush compresses synchronously and may wait for a running background job: run it off the
  // gRPC callback threads, which must never block.
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const bool queued = blocking_->TrySchedule([this, reactor, resp, start, s = *session] {
    v1::FlushResponse out;
    Handlers::FlushNow(*s, &out);
    SerializeMessage(out, resp);
    metrics()->RecordRpc("Flush", grpc::StatusCode::OK, absl::Now() - start);
    reactor->Finish(grpc::Status::OK);
  });
  if (!queued) {
    const grpc::Status st(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "too many Flush calls in progress; retry later");
    metrics()->RecordRpc("Flush", st.error_code(), absl::Now() - start);
    reactor->Finish(st);
  }
  return reactor;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvCacheServiceImpl::ReadKV(
    grpc::CallbackServerContext* ctx, const Bytes* req) {
  const absl::Time start = absl::Now();
  v1::ReadKVRequest r;
  absl::StatusOr<std::unique_ptr<ReadCall>> call =
      [&]() -> absl::StatusOr<std::unique_ptr<ReadCall>> {
    SPARSEKV_ASSIGN_OR_RETURN(const Caller caller, Authenticate(ctx));
    SPARSEKV_RETURN_IF_ERROR(ParseMessage(*req, &r, ""));
    return ReadCall::Start(&handlers_, caller, r);
  }();
  if (!call.ok()) {
    return new FinishNow<grpc::ServerWriteReactor<grpc::ByteBuffer>>(metrics(), "ReadKV", start,
                                                                     call.status());
  }
  return new CallWriter<ReadCall, v1::ReadKVResponse>(metrics(), "ReadKV", start, *std::move(call));
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvCacheServiceImpl::ExportSession(
    grpc::CallbackServerContext* ctx, const Bytes* req) {
  const absl::Time start = absl::Now();
  v1::ExportSessionRequest r;
  absl::StatusOr<std::unique_ptr<ExportCall>> call =
      [&]() -> absl::StatusOr<std::unique_ptr<ExportCall>> {
    SPARSEKV_ASSIGN_OR_RETURN(const Caller caller, Authenticate(ctx));
    SPARSEKV_RETURN_IF_ERROR(ParseMessage(*req, &r, ""));
    return ExportCall::Start(&handlers_, caller, r);
  }();
  if (!call.ok()) {
    return new FinishNow<grpc::ServerWriteReactor<grpc::ByteBuffer>>(metrics(), "ExportSession",
                                                                     start, call.status());
  }
  return new CallWriter<ExportCall, v1::SessionChunk>(metrics(), "ExportSession", start,
                                                      *std::move(call));
}

grpc::ServerReadReactor<grpc::ByteBuffer>* KvCacheServiceImpl::ImportSession(
    grpc::CallbackServerContext* ctx, Bytes* resp) {
  const absl::Time start = absl::Now();
  absl::StatusOr<Caller> caller = Authenticate(ctx);
  if (!caller.ok()) {
    return new FinishNow<grpc::ServerReadReactor<Bytes>>(metrics(), "ImportSession", start,
                                                         caller.status());
  }
  return new ImportReactor(&handlers_, *std::move(caller), resp, start);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                            const Bytes* req, Bytes* resp) {
  return Unary<v1::GetServerInfoRequest, v1::ServerInfo>(
      ctx, "GetServerInfo", req, resp, [&](const Caller&, const auto&, auto* out) {
        handlers_.ServerInfo(out);
        return absl::OkStatus();
      });
}

}  // namespace sparsekv::service
