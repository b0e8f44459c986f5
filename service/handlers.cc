#include "service/handlers.h"

#include <algorithm>
#include <future>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status_macros.h"
#include "core/snapshot.h"
#include "service/convert.h"
#include "service/grpc_status.h"

namespace sparsekv::service {
namespace {

// Room left in a message for everything but tensor payload (field tags, shapes, ids).
constexpr int64_t kMessageOverheadBytes = 4096;

absl::Status Ask(const CancelCheck& cancel) { return cancel ? cancel() : absl::OkStatus(); }

}  // namespace

std::string StreamMessage(int64_t index) {
  return absl::StrCat("message ", index + 1, " of the stream");
}

Handlers::Handlers(SessionStore* store, Metrics* metrics, BuildInfo build, ServiceLimits limits)
    : store_(store), metrics_(metrics), build_(std::move(build)), limits_(limits) {}

absl::Status Handlers::CheckServing() const {
  if (shutting_down_.load()) return absl::UnavailableError("server is shutting down");
  return absl::OkStatus();
}

int64_t Handlers::PayloadRoom() const {
  return std::min(limits_.read_chunk_bytes, limits_.max_message_bytes - kMessageOverheadBytes);
}

int64_t Handlers::MaxImportBytes() const {
  const int64_t limit = store_->budget().limit();
  return limit > 0 ? limit : int64_t{16} << 30;
}

absl::StatusOr<std::shared_ptr<Session>> Handlers::Find(const Caller& caller,
                                                        const std::string& id) const {
  return store_->Get(id, caller.scope());
}

absl::Status Handlers::CreateSession(const Caller& caller, const v1::CreateSessionRequest& req,
                                     const CancelCheck& cancel, v1::Session* out) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  SPARSEKV_RETURN_IF_ERROR(Ask(cancel));
  SPARSEKV_ASSIGN_OR_RETURN(CreateSessionParams params, FromProto(req));
  SPARSEKV_ASSIGN_OR_RETURN(params.tenant, caller.CreateTenant(params.tenant));
  SPARSEKV_ASSIGN_OR_RETURN(SessionInfo info, store_->Create(std::move(params)));
  ToProto(info, out);
  return absl::OkStatus();
}

absl::Status Handlers::GetSession(const Caller& caller, const v1::GetSessionRequest& req,
                                  v1::Session* out) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, req.session_id()));
  ToProto(s->Info(), out);
  return absl::OkStatus();
}

absl::Status Handlers::ListSessions(const Caller& caller, const v1::ListSessionsRequest& req,
                                    v1::ListSessionsResponse* out) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  SPARSEKV_ASSIGN_OR_RETURN(const std::string tenant, caller.ListTenant(req.tenant()));
  const int page_size =
      req.page_size() == 0 ? 100 : static_cast<int>(std::min<uint32_t>(req.page_size(), 1000));
  ListSessionsResult page = store_->List(tenant, page_size, req.page_token());
  // A page ends early where the next session would push the response over the message limit;
  // the token then resumes after the last one sent.
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
}

absl::Status Handlers::DeleteSession(const Caller& caller, const v1::DeleteSessionRequest& req,
                                     v1::DeleteSessionResponse* out) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  // Confined like Find, inside the store's lock: the check and the removal are one step.
  SPARSEKV_ASSIGN_OR_RETURN(int64_t freed, store_->Delete(req.session_id(), caller.scope()));
  out->set_bytes_freed(freed);
  return absl::OkStatus();
}

void Handlers::DecodeAsync(const Caller& caller, const v1::DecodeRequest& req,
                           const CancelCheck& cancel, v1::DecodeResponse* out,
                           std::function<void(absl::Status)> done) {
  absl::Status st = CheckServing();
  if (st.ok()) st = Ask(cancel);
  if (st.ok() && req.items_size() == 0)
    st = absl::InvalidArgumentError("DecodeRequest has no items");
  DType out_dtype = DType::kFloat32;
  if (st.ok() && req.out_dtype() != v1::DTYPE_UNSPECIFIED) {
    absl::StatusOr<DType> d = FromProto(req.out_dtype(), "out_dtype");
    if (d.ok()) out_dtype = *d;
    st = d.status();
  }
  std::vector<DecodeInput> items;
  items.reserve(req.items_size());
  for (int i = 0; st.ok() && i < req.items_size(); ++i) {
    absl::StatusOr<DecodeInput> in = FromProto(req.items(i), "item");
    if (!in.ok()) {
      st = absl::Status(in.status().code(),
                        req.items_size() == 1
                            ? std::string(in.status().message())
                            : absl::StrCat("items[", i, "]: ", in.status().message()));
      break;
    }
    items.push_back(*std::move(in));
  }
  if (!st.ok()) {
    done(std::move(st));
    return;
  }
  // What the answer needs of each item once the batcher has taken the items. The q shape is
  // unchecked here (the batcher's admission checks it): it is read only on success.
  struct Shape {
    std::vector<int64_t> q;
    bool want_lse, appended;
  };
  std::vector<Shape> shapes;
  shapes.reserve(items.size());
  for (const DecodeInput& in : items)
    shapes.push_back({in.q.shape, in.want_lse, !in.new_k.empty()});
  const uint64_t request_id = req.request_id();
  store_->SubmitDecode(
      std::move(items),
      [this, shapes = std::move(shapes), out_dtype, request_id, out, done = std::move(done)](
          absl::Status st, std::vector<DecodeOutput> outputs) {
        if (!st.ok()) {
          done(std::move(st));
          return;
        }
        int64_t appended = 0;
        for (size_t i = 0; i < outputs.size(); ++i) {
          const DecodeOutput& o = outputs[i];
          const Shape& sh = shapes[i];
          v1::DecodeResult* r = out->add_results();
          // Admitted: q is [num_q_heads, head_dim].
          FloatsToTensor(o.out, sh.q, out_dtype, r->mutable_out());
          if (sh.want_lse) FloatsToTensor(o.lse, {sh.q[0]}, DType::kFloat32, r->mutable_lse());
          r->set_tokens_attended(o.tokens_attended);
          appended += sh.appended ? 1 : 0;
        }
        out->set_request_id(request_id);
        metrics_->AddDecodeItems(static_cast<int64_t>(outputs.size()));
        if (appended) metrics_->AddAppendedRows(appended);
        done(absl::OkStatus());
      },
      // Confined like Find, in the batch's own lookups.
      std::string(caller.scope()));
}

absl::Status Handlers::Decode(const Caller& caller, const v1::DecodeRequest& req,
                              const CancelCheck& cancel, v1::DecodeResponse* out) {
  std::promise<absl::Status> result;
  DecodeAsync(caller, req, cancel, out,
              [&result](absl::Status st) { result.set_value(std::move(st)); });
  return result.get_future().get();
}

void Handlers::AnswerStreamMessage(const v1::DecodeRequest& req, const absl::Status& st,
                                   v1::DecodeResponse* out) {
  out->set_request_id(req.request_id());
  if (!st.ok()) {
    out->clear_results();
    const grpc::Status g = ToGrpcStatus(st);
    out->set_error_code(static_cast<int>(g.error_code()));
    out->set_error_message(g.error_message());
  }
}

absl::Status Handlers::DecodeStreamMessage(const Caller& caller, const v1::DecodeRequest& req,
                                           v1::DecodeResponse* out) {
  out->Clear();
  const absl::Status st = Decode(caller, req, nullptr, out);
  AnswerStreamMessage(req, st, out);
  return st;
}

absl::Status Handlers::DecodeStreamBroken(const absl::Status& parsed, int64_t answered) {
  return absl::Status(parsed.code(), absl::StrCat("DecodeStream: ", parsed.message(), " (",
                                                  answered, " earlier requests answered)"));
}

absl::StatusOr<std::shared_ptr<Session>> Handlers::FlushTarget(const Caller& caller,
                                                               const v1::FlushRequest& req,
                                                               const CancelCheck& cancel) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  SPARSEKV_RETURN_IF_ERROR(Ask(cancel));
  return Find(caller, req.session_id());
}

void Handlers::FlushNow(Session& session, v1::FlushResponse* out) {
  const FlushResult flushed = session.Flush();
  out->set_tokens_compressed(flushed.compressed);
  out->set_tokens_left_dense(flushed.left_dense);
  ToProto(session.Info().stats, out->mutable_stats());
}

void Handlers::ServerInfo(v1::ServerInfo* out) const {
  out->set_version(build_.version);
  out->set_git_commit(build_.git_commit);
  out->set_kernel_backend(build_.kernel_backend);
  out->set_kernel_variant(build_.kernel_variant);
  out->set_max_message_bytes(limits_.max_message_bytes);
  out->set_host_budget_bytes(store_->budget().limit());
  const StoreStats s = store_->Stats();
  out->set_host_bytes_used(s.bytes_used);
  out->set_sessions(s.sessions);
}

absl::StatusOr<int64_t> Handlers::AppendOne(const Caller& caller, const v1::AppendKVRequest& req,
                                            std::string* session_id, const CancelCheck& cancel) {
  SPARSEKV_RETURN_IF_ERROR(CheckServing());
  if (req.session_id().empty()) {
    return absl::InvalidArgumentError("AppendKVRequest.session_id is required");
  }
  if (!session_id->empty() && *session_id != req.session_id()) {
    return absl::InvalidArgumentError(
        "all messages of an AppendKV stream must name the same session");
  }
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, req.session_id()));
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

absl::Status AppendCall::Take(const absl::Status& parsed, const v1::AppendKVRequest& req,
                              const CancelCheck& cancel) {
  absl::StatusOr<int64_t> rows =
      parsed.ok() ? h_->AppendOne(caller_, req, &session_id_, cancel) : parsed;
  if (!rows.ok()) {
    const absl::Status& e = rows.status();
    return absl::Status(
        e.code(), absl::StrCat("AppendKV ", StreamMessage(resp_.messages()), ": ", e.message(),
                               " (", resp_.messages(), " earlier messages applied, ",
                               resp_.tokens_appended(), " token rows)"));
  }
  resp_.set_messages(resp_.messages() + 1);
  resp_.set_tokens_appended(resp_.tokens_appended() + *rows);
  return absl::OkStatus();
}

absl::Status AppendCall::Finish(v1::AppendKVResponse* out) {
  if (session_id_.empty()) return absl::InvalidArgumentError("AppendKV stream carried no messages");
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, h_->Find(caller_, session_id_));
  *out = resp_;
  for (int64_t t : s->Info().stats.tokens_per_layer) out->add_tokens_per_layer(t);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ReadCall>> ReadCall::Start(Handlers* h, const Caller& caller,
                                                          const v1::ReadKVRequest& req) {
  SPARSEKV_RETURN_IF_ERROR(h->CheckServing());
  std::unique_ptr<ReadCall> call(new ReadCall());
  SPARSEKV_ASSIGN_OR_RETURN(call->session_, h->Find(caller, req.session_id()));
  const Session& session = *call->session_;
  const int layers = session.layout().num_layers;
  const uint64_t begin = req.layer_begin();
  const uint64_t end = req.layer_count() == 0 ? layers : begin + req.layer_count();
  if (begin >= static_cast<uint64_t>(layers) || end > static_cast<uint64_t>(layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat("layers [", begin, ", ", end, ") outside the session's ", layers, " layers"));
  }
  if (req.token_begin() > (uint64_t{1} << 40) || req.token_count() > (uint64_t{1} << 40)) {
    return absl::InvalidArgumentError("token_begin/token_count out of range");
  }
  // The range must lie inside every layer it names: reading past the end is an error, not an
  // empty answer.
  const uint64_t token_end = req.token_begin() + req.token_count();
  for (uint64_t l = begin; l < end; ++l) {
    const uint64_t have = static_cast<uint64_t>(session.tokens(static_cast<int>(l)));
    if (req.token_begin() > have || token_end > have) {
      return absl::OutOfRangeError(absl::StrCat("tokens [", req.token_begin(), ", ",
                                                req.token_count() ? token_end : have,
                                                ") outside layer ", l, "'s ", have, " tokens"));
    }
  }
  // Messages stay under the smaller of the read chunk and the message limit.
  const int64_t row = session.layout().token_bytes();
  if (row > h->PayloadRoom()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "one token row of this session (", row, " bytes of K and V) does not fit in a ",
        h->limits().max_message_bytes, "-byte message (--max_message_bytes)"));
  }
  call->rows_per_msg_ = h->PayloadRoom() / row;
  call->layer_ = static_cast<int>(begin);
  call->layer_end_ = static_cast<int>(end);
  call->token_begin_ = static_cast<int64_t>(req.token_begin());
  call->token_count_ = static_cast<int64_t>(req.token_count());
  call->next_token_ = call->token_begin_;
  return call;
}

bool ReadCall::Next(v1::ReadKVResponse* msg, absl::Status* status) {
  *status = absl::OkStatus();
  while (layer_ < layer_end_) {
    const int64_t layer_tokens = session_->tokens(layer_);
    const int64_t end =
        token_count_ > 0 ? std::min(layer_tokens, token_begin_ + token_count_) : layer_tokens;
    if (next_token_ < end) {
      const int64_t rows = std::min(rows_per_msg_, end - next_token_);
      msg->Clear();
      msg->set_layer(layer_);
      msg->set_token_begin(next_token_);
      const Layout& l = session_->layout();
      absl::StatusOr<int64_t> read =
          session_->Read(layer_, next_token_, rows, msg->mutable_k()->mutable_data(),
                         msg->mutable_v()->mutable_data());
      if (!read.ok()) {
        *status = read.status();
        return false;
      }
      for (v1::Tensor* t : {msg->mutable_k(), msg->mutable_v()}) {
        t->set_dtype(ToProto(l.dtype));
        t->add_shape(rows);
        t->add_shape(l.num_kv_heads);
        t->add_shape(l.head_dim);
      }
      next_token_ += rows;
      return true;
    }
    ++layer_;
    next_token_ = token_begin_;
  }
  return false;
}

absl::StatusOr<std::unique_ptr<ExportCall>> ExportCall::Start(Handlers* h, const Caller& caller,
                                                              const v1::ExportSessionRequest& req) {
  SPARSEKV_RETURN_IF_ERROR(h->CheckServing());
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, h->Find(caller, req.session_id()));
  return std::unique_ptr<ExportCall>(
      new ExportCall(SerializeSnapshot(session->Export()), h->PayloadRoom()));
}

bool ExportCall::Next(v1::SessionChunk* msg, absl::Status* status) {
  *status = absl::OkStatus();
  if (done_) return false;
  const size_t n = std::min<size_t>(static_cast<size_t>(piece_), bytes_.size() - offset_);
  msg->Clear();
  msg->set_format_version(kSnapshotVersion);
  msg->set_offset(offset_);
  msg->set_data(bytes_.data() + offset_, n);
  msg->set_crc32c(Crc32c(msg->data()));
  offset_ += n;
  done_ = offset_ == bytes_.size();
  msg->set_last(done_);
  return true;
}

absl::Status ImportCall::Take(const absl::Status& parsed, const v1::SessionChunk& piece) {
  const std::string where = StreamMessage(pieces_);
  SPARSEKV_RETURN_IF_ERROR(h_->CheckServing());
  SPARSEKV_RETURN_IF_ERROR(parsed);
  if (piece.format_version() != kSnapshotVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("ImportSession ", where, ": snapshot format version ", piece.format_version(),
                     "; this server reads ", kSnapshotVersion));
  }
  if (piece.offset() != bytes_.size()) {
    return absl::DataLossError(absl::StrCat("ImportSession ", where, " starts at byte ",
                                            piece.offset(), ", expected ", bytes_.size()));
  }
  if (Crc32c(piece.data()) != piece.crc32c()) {
    return absl::DataLossError(absl::StrCat("ImportSession ", where, " fails its checksum"));
  }
  if (static_cast<int64_t>(bytes_.size() + piece.data().size()) > max_bytes_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("ImportSession: the snapshot is larger than the ", max_bytes_,
                     " bytes this server could hold (--host_budget_bytes)"));
  }
  bytes_ += piece.data();
  last_ = piece.last();
  ++pieces_;
  return absl::OkStatus();
}

absl::Status ImportCall::Finish(v1::Session* out) {
  SPARSEKV_ASSIGN_OR_RETURN(SessionImage image, ParseSnapshot(bytes_, h_->store()->limits()));
  SPARSEKV_ASSIGN_OR_RETURN(image.info.tenant, caller_.CreateTenant(image.info.tenant));
  SPARSEKV_ASSIGN_OR_RETURN(SessionInfo info, h_->store()->Import(image));
  ToProto(info, out);
  return absl::OkStatus();
}

absl::Status ImportCall::EndedEarly() const {
  return absl::InvalidArgumentError(
      absl::StrCat("ImportSession: the stream ended before the last piece (", bytes_.size(),
                   " bytes received)"));
}

}  // namespace sparsekv::service
