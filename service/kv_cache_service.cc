#include "service/kv_cache_service.h"

#include <chrono>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "service/convert.h"
#include "service/grpc_status.h"

namespace sparsekv::service {
namespace {

// The capability each unbuilt RPC waits for, named in its UNIMPLEMENTED message.
constexpr char kSnapshotIssue[] =
    "session snapshots (export/import) are not implemented yet (DESIGN.md section 4)";

absl::Status CheckDeadline(const grpc::CallbackServerContext* ctx) {
  if (ctx->deadline() < std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError("deadline expired before the request was handled");
  }
  return absl::OkStatus();
}

// Finishes a streaming call at once with a status (for RPCs that are not built yet or
// requests rejected before the first message). `Base` is a ServerWriteReactor or
// ServerReadReactor.
template <typename Base>
class FinishNow final : public Base {
 public:
  FinishNow(Metrics* metrics, const char* method, absl::Time start, absl::Status status)
      : metrics_(metrics), method_(method), start_(start), status_(ToGrpcStatus(status)) {
    this->Finish(status_);
  }
  void OnDone() override {
    metrics_->RecordRpc(method_, status_.error_code(), absl::Now() - start_);
    delete this;
  }

 private:
  Metrics* metrics_;
  const char* method_;
  absl::Time start_;
  grpc::Status status_;
};

// AppendKV: applies each message as it arrives; the first error ends the call with that
// status (messages already applied stay applied, as the response to a later retry shows in
// tokens_per_layer).
class AppendReactor final : public grpc::ServerReadReactor<v1::AppendKVRequest> {
 public:
  AppendReactor(KvCacheServiceImpl* svc, v1::AppendKVResponse* resp)
      : svc_(svc), resp_(resp), start_(absl::Now()) {
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // client finished sending (or the call broke; Finish is then ignored)
      FinishWith(Summarise());
      return;
    }
    absl::StatusOr<int64_t> rows = svc_->RunAppend(req_, &session_id_);
    if (!rows.ok()) {
      FinishWith(rows.status());
      return;
    }
    resp_->set_messages(resp_->messages() + 1);
    resp_->set_tokens_appended(resp_->tokens_appended() + *rows);
    StartRead(&req_);
  }

  void OnDone() override {
    svc_->metrics()->RecordRpc("AppendKV", status_.error_code(), absl::Now() - start_);
    delete this;
  }

 private:
  absl::Status Summarise() {
    if (session_id_.empty()) {
      return absl::InvalidArgumentError("AppendKV stream carried no messages");
    }
    SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, svc_->store()->Get(session_id_));
    for (int64_t t : s->Info().stats.tokens_per_layer) resp_->add_tokens_per_layer(t);
    return absl::OkStatus();
  }

  void FinishWith(const absl::Status& st) {
    status_ = ToGrpcStatus(st);
    Finish(status_);
  }

  KvCacheServiceImpl* svc_;
  v1::AppendKVResponse* resp_;
  absl::Time start_;
  v1::AppendKVRequest req_;
  std::string session_id_;
  grpc::Status status_;
};

// DecodeStream: read a request, answer it, then read the next. A failed request gets an
// error response and the stream goes on; shutdown or a broken call ends it.
class DecodeStreamReactor final
    : public grpc::ServerBidiReactor<v1::DecodeRequest, v1::DecodeResponse> {
 public:
  explicit DecodeStreamReactor(KvCacheServiceImpl* svc) : svc_(svc), start_(absl::Now()) {
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    const absl::Time t0 = absl::Now();
    resp_.Clear();
    absl::Status st = svc_->CheckServing();
    if (st.ok()) st = svc_->RunDecode(req_, &resp_);
    resp_.set_request_id(req_.request_id());
    if (!st.ok()) {
      resp_.clear_results();
      resp_.set_error_code(static_cast<int>(st.code()));
      resp_.set_error_message(std::string(st.message()));
    }
    // Each message is accounted like a unary call, so rates and latencies compare.
    svc_->metrics()->RecordRpc("DecodeStream", ToGrpcStatus(st).error_code(), absl::Now() - t0);
    StartWrite(&resp_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "write failed"));
      return;
    }
    StartRead(&req_);
  }

  void OnDone() override { delete this; }

 private:
  KvCacheServiceImpl* svc_;
  absl::Time start_;
  v1::DecodeRequest req_;
  v1::DecodeResponse resp_;
};

// ReadKV: one message per layer and token range of at most read_chunk_bytes of K+V.
class ReadKvReactor final : public grpc::ServerWriteReactor<v1::ReadKVResponse> {
 public:
  ReadKvReactor(KvCacheServiceImpl* svc, std::shared_ptr<Session> session, int layer_begin,
                int layer_end, int64_t token_begin, int64_t token_count)
      : svc_(svc),
        session_(std::move(session)),
        start_(absl::Now()),
        layer_(layer_begin),
        layer_end_(layer_end),
        token_begin_(token_begin),
        token_count_(token_count) {
    const int64_t row = session_->layout().token_bytes();
    rows_per_msg_ = std::max<int64_t>(1, svc_->limits().read_chunk_bytes / row);
    next_token_ = token_begin_;
    WriteNext();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      FinishWith(absl::UnavailableError("client stopped reading"));
      return;
    }
    WriteNext();
  }

  void OnDone() override {
    svc_->metrics()->RecordRpc("ReadKV", status_.error_code(), absl::Now() - start_);
    delete this;
  }

 private:
  void WriteNext() {
    while (layer_ < layer_end_) {
      const int64_t layer_tokens = session_->tokens(layer_);
      const int64_t end =
          token_count_ > 0 ? std::min(layer_tokens, token_begin_ + token_count_) : layer_tokens;
      if (next_token_ < end) {
        const int64_t rows = std::min(rows_per_msg_, end - next_token_);
        msg_.Clear();
        msg_.set_layer(layer_);
        msg_.set_token_begin(next_token_);
        const Layout& l = session_->layout();
        absl::StatusOr<int64_t> read =
            session_->Read(layer_, next_token_, rows, msg_.mutable_k()->mutable_data(),
                           msg_.mutable_v()->mutable_data());
        if (!read.ok()) {
          FinishWith(read.status());
          return;
        }
        for (v1::Tensor* t : {msg_.mutable_k(), msg_.mutable_v()}) {
          t->set_dtype(ToProto(l.dtype));
          t->add_shape(rows);
          t->add_shape(l.num_kv_heads);
          t->add_shape(l.head_dim);
        }
        next_token_ += rows;
        StartWrite(&msg_);
        return;
      }
      ++layer_;
      next_token_ = token_begin_;
    }
    FinishWith(absl::OkStatus());
  }

  void FinishWith(const absl::Status& st) {
    status_ = ToGrpcStatus(st);
    Finish(status_);
  }

  KvCacheServiceImpl* svc_;
  std::shared_ptr<Session> session_;
  absl::Time start_;
  int layer_;
  const int layer_end_;
  const int64_t token_begin_;
  const int64_t token_count_;
  int64_t next_token_ = 0;
  int64_t rows_per_msg_ = 1;
  v1::ReadKVResponse msg_;
  grpc::Status status_;
};

}  // namespace

KvCacheServiceImpl::KvCacheServiceImpl(SessionStore* store, Metrics* metrics, BuildInfo build,
                                       ServiceLimits limits)
    : store_(store),
      metrics_(metrics),
      build_(std::move(build)),
      limits_(limits),
      blocking_(std::make_unique<BoundedExecutor>(limits.blocking_threads, 1024)) {}

KvCacheServiceImpl::~KvCacheServiceImpl() { blocking_->Shutdown(); }

absl::Status KvCacheServiceImpl::CheckServing() const {
  if (shutting_down_.load()) return absl::UnavailableError("server is shutting down");
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::FinishUnary(grpc::CallbackServerContext* ctx,
                                                          const char* method, absl::Time start,
                                                          const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const grpc::Status g = ToGrpcStatus(status);
  metrics_->RecordRpc(method, g.error_code(), absl::Now() - start);
  reactor->Finish(g);
  return reactor;
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::CreateSession(grpc::CallbackServerContext* ctx,
                                                            const v1::CreateSessionRequest* req,
                                                            v1::Session* resp) {
  const absl::Time start = absl::Now();
  absl::Status st = [&]() -> absl::Status {
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_RETURN_IF_ERROR(CheckDeadline(ctx));
    SPARSEKV_ASSIGN_OR_RETURN(CreateSessionParams params, FromProto(*req));
    SPARSEKV_ASSIGN_OR_RETURN(SessionInfo info, store_->Create(std::move(params)));
    ToProto(info, resp);
    return absl::OkStatus();
  }();
  return FinishUnary(ctx, "CreateSession", start, st);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::GetSession(grpc::CallbackServerContext* ctx,
                                                         const v1::GetSessionRequest* req,
                                                         v1::Session* resp) {
  const absl::Time start = absl::Now();
  absl::Status st = [&]() -> absl::Status {
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, store_->Get(req->session_id()));
    ToProto(s->Info(), resp);
    return absl::OkStatus();
  }();
  return FinishUnary(ctx, "GetSession", start, st);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::ListSessions(grpc::CallbackServerContext* ctx,
                                                           const v1::ListSessionsRequest* req,
                                                           v1::ListSessionsResponse* resp) {
  const absl::Time start = absl::Now();
  absl::Status st = [&]() -> absl::Status {
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    const int page_size =
        req->page_size() == 0 ? 100 : static_cast<int>(std::min<uint32_t>(req->page_size(), 1000));
    ListSessionsResult r = store_->List(req->tenant(), page_size, req->page_token());
    for (const SessionInfo& info : r.sessions) ToProto(info, resp->add_sessions());
    resp->set_next_page_token(r.next_page_token);
    return absl::OkStatus();
  }();
  return FinishUnary(ctx, "ListSessions", start, st);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::DeleteSession(grpc::CallbackServerContext* ctx,
                                                            const v1::DeleteSessionRequest* req,
                                                            v1::DeleteSessionResponse* resp) {
  const absl::Time start = absl::Now();
  absl::Status st = [&]() -> absl::Status {
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_ASSIGN_OR_RETURN(int64_t freed, store_->Delete(req->session_id()));
    resp->set_bytes_freed(freed);
    return absl::OkStatus();
  }();
  return FinishUnary(ctx, "DeleteSession", start, st);
}

absl::StatusOr<int64_t> KvCacheServiceImpl::RunAppend(const v1::AppendKVRequest& req,
                                                      std::string* session_id) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  if (req.session_id().empty()) {
    return absl::InvalidArgumentError("AppendKVRequest.session_id is required");
  }
  if (!session_id->empty() && *session_id != req.session_id()) {
    return absl::InvalidArgumentError(
        absl::StrCat("all messages of an AppendKV stream must name "
                     "the same session: got \"",
                     req.session_id(), "\" after \"", *session_id, "\""));
  }
  *session_id = req.session_id();
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, store_->Get(req.session_id()));
  SPARSEKV_ASSIGN_OR_RETURN(TensorView k, ViewTensor(req.k(), "k"));
  SPARSEKV_ASSIGN_OR_RETURN(TensorView v, ViewTensor(req.v(), "v"));
  SPARSEKV_ASSIGN_OR_RETURN(TensorView obs_q, ViewOptionalTensor(req.obs_q(), "obs_q"));
  if (k.dtype != v.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("k is ", kernels::DTypeName(k.dtype),
                                                   " but v is ", kernels::DTypeName(v.dtype)));
  }
  SPARSEKV_ASSIGN_OR_RETURN(
      int64_t rows,
      s->Append(static_cast<int>(std::min<uint32_t>(req.layer_begin(), 0x7fffffff)), k, v, obs_q));
  metrics_->AddAppendedRows(rows);
  metrics_->AddReceivedBytes(static_cast<int64_t>(req.k().data().size() + req.v().data().size()));
  return rows;
}

grpc::ServerReadReactor<v1::AppendKVRequest>* KvCacheServiceImpl::AppendKV(
    grpc::CallbackServerContext* ctx, v1::AppendKVResponse* resp) {
  return new AppendReactor(this, resp);
}

absl::Status KvCacheServiceImpl::RunDecode(const v1::DecodeRequest& req, v1::DecodeResponse* resp) {
  if (req.items_size() == 0) return absl::InvalidArgumentError("DecodeRequest has no items");
  DType out_dtype = DType::kFloat32;
  if (req.out_dtype() != v1::DTYPE_UNSPECIFIED) {
    SPARSEKV_ASSIGN_OR_RETURN(out_dtype, FromProto(req.out_dtype(), "out_dtype"));
  }
  std::vector<DecodeInput> items;
  items.reserve(req.items_size());
  for (int i = 0; i < req.items_size(); ++i) {
    absl::StatusOr<DecodeInput> in = FromProto(req.items(i), "item");
    if (!in.ok()) {
      return absl::Status(in.status().code(),
                          req.items_size() == 1
                              ? std::string(in.status().message())
                              : absl::StrCat("items[", i, "]: ", in.status().message()));
    }
    items.push_back(*std::move(in));
  }
  std::vector<DecodeOutput> outputs;
  SPARSEKV_RETURN_IF_ERROR(store_->DecodeBatch(items, &outputs));
  int64_t appended = 0;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const DecodeOutput& o = outputs[i];
    const int64_t heads = items[i].q.shape[0];
    const int64_t dim = items[i].q.shape[1];
    v1::DecodeResult* r = resp->add_results();
    FloatsToTensor(o.out, {heads, dim}, out_dtype, r->mutable_out());
    if (items[i].want_lse) FloatsToTensor(o.lse, {heads}, DType::kFloat32, r->mutable_lse());
    r->set_tokens_attended(o.tokens_attended);
    if (!items[i].new_k.empty()) ++appended;
  }
  resp->set_request_id(req.request_id());
  metrics_->AddDecodeItems(static_cast<int64_t>(items.size()));
  if (appended) metrics_->AddAppendedRows(appended);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::Decode(grpc::CallbackServerContext* ctx,
                                                     const v1::DecodeRequest* req,
                                                     v1::DecodeResponse* resp) {
  const absl::Time start = absl::Now();
  absl::Status st = [&]() -> absl::Status {
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_RETURN_IF_ERROR(CheckDeadline(ctx));
    return RunDecode(*req, resp);
  }();
  return FinishUnary(ctx, "Decode", start, st);
}

grpc::ServerBidiReactor<v1::DecodeRequest, v1::DecodeResponse>* KvCacheServiceImpl::DecodeStream(
    grpc::CallbackServerContext* ctx) {
  return new DecodeStreamReactor(this);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::Flush(grpc::CallbackServerContext* ctx,
                                                    const v1::FlushRequest* req,
                                                    v1::FlushResponse* resp) {
  const absl::Time start = absl::Now();
  absl::StatusOr<std::shared_ptr<Session>> session =
      [&]() -> absl::StatusOr<std::shared_ptr<Session>> {
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_RETURN_IF_ERROR(CheckDeadline(ctx));
    return store_->Get(req->session_id());
  }();
  if (!session.ok()) return FinishUnary(ctx, "Flush", start, session.status());
  // Flush compresses synchronously and may wait for a running background job: run it off the
  // gRPC callback threads, which must never block.
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const bool queued = blocking_->TrySchedule([this, reactor, resp, start, s = *session] {
    resp->set_tokens_compressed(s->Flush());
    ToProto(s->Info().stats, resp->mutable_stats());
    metrics_->RecordRpc("Flush", grpc::StatusCode::OK, absl::Now() - start);
    reactor->Finish(grpc::Status::OK);
  });
  if (!queued) {
    const grpc::Status st(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "too many Flush calls in progress; retry later");
    metrics_->RecordRpc("Flush", st.error_code(), absl::Now() - start);
    reactor->Finish(st);
  }
  return reactor;
}

grpc::ServerWriteReactor<v1::ReadKVResponse>* KvCacheServiceImpl::ReadKV(
    grpc::CallbackServerContext* ctx, const v1::ReadKVRequest* req) {
  const absl::Time start = absl::Now();
  absl::Status st = CheckServing();
  std::shared_ptr<Session> session;
  if (st.ok()) {
    absl::StatusOr<std::shared_ptr<Session>> s = store_->Get(req->session_id());
    if (s.ok()) {
      session = *std::move(s);
    } else {
      st = s.status();
    }
  }
  int layer_end = 0;
  if (st.ok()) {
    const int layers = session->layout().num_layers;
    const uint64_t begin = req->layer_begin();
    const uint64_t end = req->layer_count() == 0 ? layers : begin + req->layer_count();
    if (begin >= static_cast<uint64_t>(layers) || end > static_cast<uint64_t>(layers)) {
      st = absl::InvalidArgumentError(absl::StrCat("layers [", begin, ", ", end,
                                                   ") outside the session's ", layers, " layers"));
    }
    layer_end = static_cast<int>(end);
    if (req->token_begin() > (uint64_t{1} << 40) || req->token_count() > (uint64_t{1} << 40)) {
      st = absl::InvalidArgumentError("token_begin/token_count out of range");
    }
  }
  if (!st.ok())
    return new FinishNow<grpc::ServerWriteReactor<v1::ReadKVResponse>>(metrics_, "ReadKV", start,
                                                                       st);
  return new ReadKvReactor(this, std::move(session), static_cast<int>(req->layer_begin()),
                           layer_end, static_cast<int64_t>(req->token_begin()),
                           static_cast<int64_t>(req->token_count()));
}

grpc::ServerWriteReactor<v1::SessionChunk>* KvCacheServiceImpl::ExportSession(
    grpc::CallbackServerContext* ctx, const v1::ExportSessionRequest* req) {
  return new FinishNow<grpc::ServerWriteReactor<v1::SessionChunk>>(
      metrics_, "ExportSession", absl::Now(),
      absl::UnimplementedError(absl::StrCat("ExportSession: ", kSnapshotIssue)));
}

grpc::ServerReadReactor<v1::SessionChunk>* KvCacheServiceImpl::ImportSession(
    grpc::CallbackServerContext* ctx, v1::Session* resp) {
  return new FinishNow<grpc::ServerReadReactor<v1::SessionChunk>>(
      metrics_, "ImportSession", absl::Now(),
      absl::UnimplementedError(absl::StrCat("ImportSession: ", kSnapshotIssue)));
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                            const v1::GetServerInfoRequest* req,
                                                            v1::ServerInfo* resp) {
  const absl::Time start = absl::Now();
  resp->set_version(build_.version);
  resp->set_git_commit(build_.git_commit);
  resp->set_kernel_backend(build_.kernel_backend);
  resp->set_kernel_variant(build_.kernel_variant);
  resp->set_max_message_bytes(limits_.max_message_bytes);
  resp->set_host_budget_bytes(store_->budget().limit());
  const StoreStats s = store_->Stats();
  resp->set_host_bytes_used(s.bytes_used);
  resp->set_sessions(s.sessions);
  for (const char* m : {"ExportSession", "ImportSession"}) resp->add_unimplemented_rpcs(m);
  return FinishUnary(ctx, "GetServerInfo", start, absl::OkStatus());
}

}  // namespace sparsekv::service
