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

// Room left in a message for everything but tensor payload (field tags, shapes, ids).
constexpr int64_t kMessageOverheadBytes = 4096;

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

// "message 3 of the stream"
std::string StreamMessage(int64_t index) {
  return absl::StrCat("message ", index + 1, " of the stream");
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

// AppendKV: applies each message as it arrives, each all or nothing. The first error (a
// message that does not parse included) ends the call with a status naming the message and
// how many were applied before it; those stay applied, as tokens_per_layer of a later call
// shows.
class AppendReactor final : public RecordedReactor<grpc::ServerReadReactor<grpc::ByteBuffer>> {
 public:
  AppendReactor(KvCacheServiceImpl* svc, grpc::CallbackServerContext* ctx, grpc::ByteBuffer* resp)
      : RecordedReactor(svc->metrics(), "AppendKV"), svc_(svc), ctx_(ctx), resp_bytes_(resp) {
    StartRead(&buf_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // client finished sending, or the call broke (then OnCancel ran or will run)
      FinishWith(Summarise());
      return;
    }
    absl::Status st = ParseMessage(buf_, &req_, StreamMessage(resp_.messages()));
    absl::StatusOr<int64_t> rows =
        st.ok() ? svc_->RunAppend(req_, &session_id_, CallCancelCheck(ctx_)) : st;
    if (!rows.ok()) {
      const absl::Status& e = rows.status();
      FinishWith(absl::Status(
          e.code(), absl::StrCat("AppendKV ", StreamMessage(resp_.messages()), ": ", e.message(),
                                 " (", resp_.messages(), " earlier messages applied, ",
                                 resp_.tokens_appended(), " token rows)")));
      return;
    }
    resp_.set_messages(resp_.messages() + 1);
    resp_.set_tokens_appended(resp_.tokens_appended() + *rows);
    StartRead(&buf_);
  }

 private:
  absl::Status Summarise() {
    if (session_id_.empty()) {
      return absl::InvalidArgumentError("AppendKV stream carried no messages");
    }
    SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, svc_->store()->Get(session_id_));
    for (int64_t t : s->Info().stats.tokens_per_layer) resp_.add_tokens_per_layer(t);
    SerializeMessage(resp_, resp_bytes_);
    return absl::OkStatus();
  }

  KvCacheServiceImpl* svc_;
  grpc::CallbackServerContext* ctx_;
  grpc::ByteBuffer* resp_bytes_;
  grpc::ByteBuffer buf_;
  v1::AppendKVRequest req_;
  v1::AppendKVResponse resp_;
  std::string session_id_;
  grpc::Status status_;
  std::atomic<bool> cancelled_{false};
};

// DecodeStream: read a request, answer it, then read the next. A request that fails
// validation gets an error response and the stream goes on; a message that does not parse
// (no request id can be answered), shutdown or a broken call ends it.
class DecodeStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit DecodeStreamReactor(KvCacheServiceImpl* svc) : svc_(svc) { StartRead(&in_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    const absl::Time t0 = absl::Now();
    absl::Status st = ParseMessage(in_, &req_, StreamMessage(answered_));
    if (!st.ok()) {
      svc_->metrics()->RecordRpc("DecodeStream", ToGrpcStatus(st).error_code(), absl::Now() - t0);
      Finish(ToGrpcStatus(
          absl::Status(st.code(), absl::StrCat("DecodeStream: ", st.message(), " (", answered_,
                                               " earlier requests answered)"))));
      return;
    }
    resp_.Clear();
    st = svc_->CheckServing();
    if (st.ok()) st = svc_->RunDecode(req_, &resp_);
    resp_.set_request_id(req_.request_id());
    if (!st.ok()) {
      resp_.clear_results();
      const grpc::Status g = ToGrpcStatus(st);
      resp_.set_error_code(static_cast<int>(g.error_code()));
      resp_.set_error_message(g.error_message());
    }
    // Each message is accounted like a unary call, so rates and latencies compare.
    svc_->metrics()->RecordRpc("DecodeStream", ToGrpcStatus(st).error_code(), absl::Now() - t0);
    ++answered_;
    SerializeMessage(resp_, &out_);
    StartWrite(&out_);
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
  KvCacheServiceImpl* svc_;
  grpc::ByteBuffer in_, out_;
  v1::DecodeRequest req_;
  v1::DecodeResponse resp_;
  int64_t answered_ = 0;
};

// ReadKV: one message per layer and token range, each under the message size limit.
class ReadKvReactor final : public StreamWriter {
 public:
  // REQUIRES: the range was checked against the session (every layer holds token_end).
  ReadKvReactor(KvCacheServiceImpl* svc, std::shared_ptr<Session> session, int layer_begin,
                int layer_end, int64_t token_begin, int64_t token_count, int64_t rows_per_msg)
      : StreamWriter(svc->metrics(), "ReadKV"),
        session_(std::move(session)),
        layer_(layer_begin),
        layer_end_(layer_end),
        token_begin_(token_begin),
        token_count_(token_count),
        rows_per_msg_(rows_per_msg) {
    next_token_ = token_begin_;
    WriteNext();
  }

 private:
  void WriteNext() override {
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
        SerializeMessage(msg_, &out_);
        StartWrite(&out_);
        return;
      }
      ++layer_;
      next_token_ = token_begin_;
    }
    FinishWith(absl::OkStatus());
  }

  std::shared_ptr<Session> session_;
  int layer_;
  const int layer_end_;
  const int64_t token_begin_;
  const int64_t token_count_;
  const int64_t rows_per_msg_;
  int64_t next_token_ = 0;
  v1::ReadKVResponse msg_;
  grpc::ByteBuffer out_;
  grpc::Status status_;
  std::atomic<bool> cancelled_{false};
};

// ExportSession: the session's snapshot (core/snapshot.h) in pieces under the message
// limit, each with its offset and CRC-32C; the snapshot checks itself as a whole too.
class ExportReactor final : public StreamWriter {
 public:
  ExportReactor(KvCacheServiceImpl* svc, std::string snapshot, int64_t piece_bytes)
      : StreamWriter(svc->metrics(), "ExportSession"),
        bytes_(std::move(snapshot)),
        piece_(piece_bytes) {
    WriteNext();
  }

 private:
  void WriteNext() override {
    if (done_) {
      FinishWith(absl::OkStatus());
      return;
    }
    const size_t n = std::min<size_t>(static_cast<size_t>(piece_), bytes_.size() - offset_);
    v1::SessionChunk msg;
    msg.set_format_version(kSnapshotVersion);
    msg.set_offset(offset_);
    msg.set_data(bytes_.data() + offset_, n);
    msg.set_crc32c(Crc32c(msg.data()));
    offset_ += n;
    done_ = offset_ == bytes_.size();
    msg.set_last(done_);
    SerializeMessage(msg, &out_);
    StartWrite(&out_);
  }

  const std::string bytes_;
  const int64_t piece_;
  size_t offset_ = 0;
  bool done_ = false;
  grpc::ByteBuffer out_;
  grpc::Status status_;
  std::atomic<bool> cancelled_{false};
};

// ImportSession: gathers the pieces (each checked: version, offset, CRC-32C, size cap), then
// parses and adds the session whole when the last one arrives. Any failure ends the call and
// adds nothing.
class ImportReactor final : public RecordedReactor<grpc::ServerReadReactor<grpc::ByteBuffer>> {
 public:
  ImportReactor(KvCacheServiceImpl* svc, grpc::ByteBuffer* resp, int64_t max_bytes)
      : RecordedReactor(svc->metrics(), "ImportSession"),
        svc_(svc),
        resp_(resp),
        max_bytes_(max_bytes) {
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      FinishWith(absl::InvalidArgumentError(
          absl::StrCat("ImportSession: the stream ended before the last piece (", bytes_.size(),
                       " bytes received)")));
      return;
    }
    absl::Status st = Take();
    if (!st.ok()) {
      FinishWith(st);
      return;
    }
    if (!last_) {
      StartRead(&in_);
      return;
    }
    FinishWith(Import());
  }

 private:
  absl::Status Take() {
    const std::string where = StreamMessage(pieces_);
    SPARSEKV_RETURN_IF_ERROR(svc_->CheckServing());
    SPARSEKV_RETURN_IF_ERROR(ParseMessage(in_, &msg_, where));
    if (msg_.format_version() != kSnapshotVersion) {
      return absl::FailedPreconditionError(
          absl::StrCat("ImportSession ", where, ": snapshot format version ", msg_.format_version(),
                       "; this server reads ", kSnapshotVersion));
    }
    if (msg_.offset() != bytes_.size()) {
      return absl::DataLossError(absl::StrCat("ImportSession ", where, " starts at byte ",
                                              msg_.offset(), ", expected ", bytes_.size()));
    }
    if (Crc32c(msg_.data()) != msg_.crc32c()) {
      return absl::DataLossError(absl::StrCat("ImportSession ", where, " fails its checksum"));
    }
    if (static_cast<int64_t>(bytes_.size() + msg_.data().size()) > max_bytes_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("ImportSession: the snapshot is larger than the ", max_bytes_,
                       " bytes this server could hold (--host_budget_bytes)"));
    }
    bytes_ += msg_.data();
    last_ = msg_.last();
    ++pieces_;
    return absl::OkStatus();
  }

  absl::Status Import() {
    SPARSEKV_ASSIGN_OR_RETURN(SessionImage image, ParseSnapshot(bytes_, svc_->store()->limits()));
    SPARSEKV_ASSIGN_OR_RETURN(SessionInfo info, svc_->store()->Import(image));
    v1::Session out;
    ToProto(info, &out);
    SerializeMessage(out, resp_);
    return absl::OkStatus();
  }

  KvCacheServiceImpl* svc_;
  grpc::ByteBuffer* resp_;
  const int64_t max_bytes_;
  grpc::ByteBuffer in_;
  v1::SessionChunk msg_;
  std::string bytes_;
  int64_t pieces_ = 0;
  bool last_ = false;
  grpc::Status status_;
  std::atomic<bool> cancelled_{false};
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

template <typename Request, typename Response, typename Body>
grpc::ServerUnaryReactor* KvCacheServiceImpl::Unary(grpc::CallbackServerContext* ctx,
                                                    const char* method, const Bytes* req,
                                                    Bytes* resp, Body body) {
  const absl::Time start = absl::Now();
  Request request;
  Response response;
  absl::Status st = ParseMessage(*req, &request, "");
  if (st.ok()) st = CheckServing();
  if (st.ok()) st = body(request, &response);
  if (st.ok()) SerializeMessage(response, resp);
  return FinishUnary(ctx, method, start, st);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::CreateSession(grpc::CallbackServerContext* ctx,
                                                            const Bytes* req, Bytes* resp) {
  return Unary<v1::CreateSessionRequest, v1::Session>(
      ctx, "CreateSession", req, resp,
      [&](const v1::CreateSessionRequest& r, v1::Session* out) -> absl::Status {
        SPARSEKV_RETURN_IF_ERROR(CheckDeadline(ctx));
        SPARSEKV_ASSIGN_OR_RETURN(CreateSessionParams params, FromProto(r));
        SPARSEKV_ASSIGN_OR_RETURN(SessionInfo info, store_->Create(std::move(params)));
        ToProto(info, out);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::GetSession(grpc::CallbackServerContext* ctx,
                                                         const Bytes* req, Bytes* resp) {
  return Unary<v1::GetSessionRequest, v1::Session>(
      ctx, "GetSession", req, resp,
      [&](const v1::GetSessionRequest& r, v1::Session* out) -> absl::Status {
        SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, store_->Get(r.session_id()));
        ToProto(s->Info(), out);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::ListSessions(grpc::CallbackServerContext* ctx,
                                                           const Bytes* req, Bytes* resp) {
  return Unary<v1::ListSessionsRequest, v1::ListSessionsResponse>(
      ctx, "ListSessions", req, resp,
      [&](const v1::ListSessionsRequest& r, v1::ListSessionsResponse* out) -> absl::Status {
        const int page_size =
            r.page_size() == 0 ? 100 : static_cast<int>(std::min<uint32_t>(r.page_size(), 1000));
        ListSessionsResult page = store_->List(r.tenant(), page_size, r.page_token());
        // A page ends early where the next session would push the response over the message
        // limit; the token then resumes after the last one sent.
        const size_t room = static_cast<size_t>(limits_.max_message_bytes - kMessageOverheadBytes);
        for (size_t i = 0; i < page.sessions.size(); ++i) {
          v1::Session one;
          ToProto(page.sessions[i], &one);
          if (out->ByteSizeLong() + one.ByteSizeLong() + 16 > room) {
            if (i == 0) {
              return absl::ResourceExhaustedError(
                  absl::StrCat("session \"", page.sessions[i].id,
                               "\" does not fit in one message (--max_message_bytes)"));
            }
            out->set_next_page_token(page.sessions[i - 1].id);
            return absl::OkStatus();
          }
          *out->add_sessions() = std::move(one);
        }
        out->set_next_page_token(page.next_page_token);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::DeleteSession(grpc::CallbackServerContext* ctx,
                                                            const Bytes* req, Bytes* resp) {
  return Unary<v1::DeleteSessionRequest, v1::DeleteSessionResponse>(
      ctx, "DeleteSession", req, resp,
      [&](const v1::DeleteSessionRequest& r, v1::DeleteSessionResponse* out) -> absl::Status {
        SPARSEKV_ASSIGN_OR_RETURN(int64_t freed, store_->Delete(r.session_id()));
        out->set_bytes_freed(freed);
        return absl::OkStatus();
      });
}

absl::StatusOr<int64_t> KvCacheServiceImpl::RunAppend(const v1::AppendKVRequest& req,
                                                      std::string* session_id,
                                                      const CancelCheck& cancel) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  if (req.session_id().empty()) {
    return absl::InvalidArgumentError("AppendKVRequest.session_id is required");
  }
  if (!session_id->empty() && *session_id != req.session_id()) {
    return absl::InvalidArgumentError(
        "all messages of an AppendKV stream must name the same session");
  }
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, store_->Get(req.session_id()));
  *session_id = req.session_id();
  SPARSEKV_ASSIGN_OR_RETURN(TensorView k, ViewTensor(req.k(), "k"));
  SPARSEKV_ASSIGN_OR_RETURN(TensorView v, ViewTensor(req.v(), "v"));
  SPARSEKV_ASSIGN_OR_RETURN(TensorView obs_q, ViewOptionalTensor(req.obs_q(), "obs_q"));
  SPARSEKV_ASSIGN_OR_RETURN(
      int64_t rows, s->Append(static_cast<int>(std::min<uint32_t>(req.layer_begin(), 0x7fffffff)),
                              k, v, obs_q, cancel));
  metrics_->AddAppendedRows(rows);
  metrics_->AddReceivedBytes(static_cast<int64_t>(req.k().data().size() + req.v().data().size()));
  return rows;
}

grpc::ServerReadReactor<grpc::ByteBuffer>* KvCacheServiceImpl::AppendKV(
    grpc::CallbackServerContext* ctx, Bytes* resp) {
  return new AppendReactor(this, ctx, resp);
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
                                                     const Bytes* req, Bytes* resp) {
  return Unary<v1::DecodeRequest, v1::DecodeResponse>(
      ctx, "Decode", req, resp,
      [&](const v1::DecodeRequest& r, v1::DecodeResponse* out) -> absl::Status {
        SPARSEKV_RETURN_IF_ERROR(CheckDeadline(ctx));
        return RunDecode(r, out);
      });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* KvCacheServiceImpl::DecodeStream(
    grpc::CallbackServerContext* ctx) {
  return new DecodeStreamReactor(this);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::Flush(grpc::CallbackServerContext* ctx,
                                                    const Bytes* req, Bytes* resp) {
  const absl::Time start = absl::Now();
  v1::FlushRequest request;
  absl::StatusOr<std::shared_ptr<Session>> session =
      [&]() -> absl::StatusOr<std::shared_ptr<Session>> {
    SPARSEKV_RETURN_IF_ERROR(ParseMessage(*req, &request, ""));
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_RETURN_IF_ERROR(CheckDeadline(ctx));
    return store_->Get(request.session_id());
  }();
  if (!session.ok()) return FinishUnary(ctx, "Flush", start, session.status());
  // Flush compresses synchronously and may wait for a running background job: run it off the
  // gRPC callback threads, which must never block.
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const bool queued = blocking_->TrySchedule([this, reactor, resp, start, s = *session] {
    v1::FlushResponse out;
    const FlushResult flushed = s->Flush();
    out.set_tokens_compressed(flushed.compressed);
    out.set_tokens_left_dense(flushed.left_dense);
    ToProto(s->Info().stats, out.mutable_stats());
    SerializeMessage(out, resp);
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

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvCacheServiceImpl::ReadKV(
    grpc::CallbackServerContext* ctx, const Bytes* req) {
  const absl::Time start = absl::Now();
  v1::ReadKVRequest r;
  std::shared_ptr<Session> session;
  int64_t rows_per_msg = 0;
  absl::Status st = [&]() -> absl::Status {
    SPARSEKV_RETURN_IF_ERROR(ParseMessage(*req, &r, ""));
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_ASSIGN_OR_RETURN(session, store_->Get(r.session_id()));
    const int layers = session->layout().num_layers;
    const uint64_t begin = r.layer_begin();
    const uint64_t end = r.layer_count() == 0 ? layers : begin + r.layer_count();
    if (begin >= static_cast<uint64_t>(layers) || end > static_cast<uint64_t>(layers)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layers [", begin, ", ", end, ") outside the session's ", layers, " layers"));
    }
    if (r.token_begin() > (uint64_t{1} << 40) || r.token_count() > (uint64_t{1} << 40)) {
      return absl::InvalidArgumentError("token_begin/token_count out of range");
    }
    // The range must lie inside every layer it names: reading past the end is an error, not
    // an empty answer.
    const uint64_t token_end = r.token_begin() + r.token_count();
    for (uint64_t l = begin; l < end; ++l) {
      const uint64_t have = static_cast<uint64_t>(session->tokens(static_cast<int>(l)));
      if (r.token_begin() > have || token_end > have) {
        return absl::OutOfRangeError(absl::StrCat("tokens [", r.token_begin(), ", ",
                                                  r.token_count() ? token_end : have,
                                                  ") outside layer ", l, "'s ", have, " tokens"));
      }
    }
    // Messages stay under the smaller of the read chunk and the message limit.
    const int64_t row = session->layout().token_bytes();
    const int64_t room =
        std::min(limits_.read_chunk_bytes, limits_.max_message_bytes - kMessageOverheadBytes);
    if (row > room) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "one token row of this session (", row, " bytes of K and V) does not fit in a ",
          limits_.max_message_bytes, "-byte message (--max_message_bytes)"));
    }
    rows_per_msg = room / row;
    return absl::OkStatus();
  }();
  if (!st.ok()) {
    return new FinishNow<grpc::ServerWriteReactor<grpc::ByteBuffer>>(metrics_, "ReadKV", start, st);
  }
  const int layer_end = static_cast<int>(r.layer_count() == 0 ? session->layout().num_layers
                                                              : r.layer_begin() + r.layer_count());
  return new ReadKvReactor(this, std::move(session), static_cast<int>(r.layer_begin()), layer_end,
                           static_cast<int64_t>(r.token_begin()),
                           static_cast<int64_t>(r.token_count()), rows_per_msg);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvCacheServiceImpl::ExportSession(
    grpc::CallbackServerContext* ctx, const Bytes* req) {
  const absl::Time start = absl::Now();
  v1::ExportSessionRequest r;
  std::shared_ptr<Session> session;
  absl::Status st = [&]() -> absl::Status {
    SPARSEKV_RETURN_IF_ERROR(ParseMessage(*req, &r, ""));
    SPARSEKV_RETURN_IF_ERROR(CheckServing());
    SPARSEKV_ASSIGN_OR_RETURN(session, store_->Get(r.session_id()));
    return absl::OkStatus();
  }();
  if (!st.ok()) {
    return new FinishNow<grpc::ServerWriteReactor<grpc::ByteBuffer>>(metrics_, "ExportSession",
                                                                     start, st);
  }
  const int64_t piece =
      std::min(limits_.read_chunk_bytes, limits_.max_message_bytes - kMessageOverheadBytes);
  return new ExportReactor(this, SerializeSnapshot(session->Export()), piece);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* KvCacheServiceImpl::ImportSession(
    grpc::CallbackServerContext* ctx, Bytes* resp) {
  // The pieces are gathered before the session exists: never more than the budget could hold
  // (16 GiB without one).
  const int64_t limit = store_->budget().limit();
  return new ImportReactor(this, resp, limit > 0 ? limit : int64_t{16} << 30);
}

grpc::ServerUnaryReactor* KvCacheServiceImpl::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                            const Bytes* req, Bytes* resp) {
  const absl::Time start = absl::Now();
  v1::GetServerInfoRequest request;
  absl::Status st = ParseMessage(*req, &request, "");
  if (st.ok()) {
    v1::ServerInfo out;
    out.set_version(build_.version);
    out.set_git_commit(build_.git_commit);
    out.set_kernel_backend(build_.kernel_backend);
    out.set_kernel_variant(build_.kernel_variant);
    out.set_max_message_bytes(limits_.max_message_bytes);
    out.set_host_budget_bytes(store_->budget().limit());
    const StoreStats s = store_->Stats();
    out.set_host_bytes_used(s.bytes_used);
    out.set_sessions(s.sessions);
    SerializeMessage(out, resp);
  }
  return FinishUnary(ctx, "GetServerInfo", start, st);
}

}  // namespace sparsekv::service
