// libFuzzer target for the whole request surface (issue #11): every RPC of the real
// KvCacheServiceImpl, served in-process by a grpc::Server and called through
// grpc::GenericStub with raw bytes, so that arbitrary bytes reach the service's own parser.
//
// Two kinds of input (fuzz_format.h has the byte format):
// - raw: request bytes for any RPC, streams split into several messages, optionally against a
//   pre-created session "fz0" so that mutated valid requests reach core/;
// - structured: sessions with layouts and policies picked from the input, then appends,
//   decodes, decode streams, flushes, reads, listings and deletes whose shapes, dtypes, byte
//   lengths, layers, sizes and values (NaN, Inf, fp16 overflow, subnormals, huge) are picked
//   from the input, checked against a model of each session.
//
// Invariants (abort() with a message on violation, so libFuzzer saves the input):
// - no RPC returns UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED or UNIMPLEMENTED;
//   DATA_LOSS only from ImportSession; CANCELLED only when the input cancelled; no status
//   message longer than 4 KiB;
// - request bytes that do not parse get INVALID_ARGUMENT (unary), end an AppendKV stream with
//   an error, end a DecodeStream with INVALID_ARGUMENT after answering every earlier message;
//   every OK response parses, every DecodeStream reply echoes its request id;
// - the server answers GetServerInfo after every input; host_bytes_used equals the sum of the
//   live sessions' bytes_accounted; after the input's sessions are deleted it is 0;
// - structured mode: a failed request changes no session, a failed AppendKV stream leaves a
//   prefix of its messages applied, tokens_attended and tokens_per_layer follow the model,
//   K/V/queries with NaN/Inf (or K/V overflowing an fp16 cache) are rejected, decode outputs
//   have the layout's shape and dtype and are finite when every input was small, ReadKV
//   returns exactly the rows asked for, all finite; an exported snapshot tiles into checksummed
//   pieces and imports back (after the original is deleted) with the same tokens, a snapshot
//   damaged in transport is refused, and one whose content was mutated with every checksum
//   fixed up either is refused or imports a session that can be read.
//
// The server is small on purpose (4 layers, 8 heads, head_dim 128, 1 MiB host budget, 6
// sessions, 256 KiB messages) so that no input can make it allocate much, and each input
// deletes what it created.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.h"
#include "common/status_macros.h"
#include "core/session_store.h"
#include "core/snapshot.h"
#include "google/protobuf/stubs/logging.h"
#include "kernels/dtype.h"
#include "service/grpc_status.h"
#include "service/handlers.h"
#include "service/kv_cache_service.h"
#include "service/metrics.h"
#include "service/server.h"
#include "service/wire.h"
#include "sparsekv/v1/kv_cache.pb.h"
#include "tests/fuzz/fuzz_format.h"

namespace sparsekv::fuzz {
namespace {

// ---------------------------------------------------------------------------------------------
// Limits of the fuzz server.
constexpr int kMaxLayers = 4;
constexpr int kMaxHeads = 8;
constexpr int kMaxHeadDim = 128;
constexpr int kMaxObsTokens = 16;
constexpr int64_t kHostBudget = 1 << 20;
constexpr int64_t kTenantBudget = 768 << 10;
constexpr int64_t kSessionBudget = 512 << 10;
constexpr int kMaxSessions = 6;
constexpr int kMaxMessageBytes = 256 << 10;
constexpr int64_t kReadChunkBytes = 64 << 10;
constexpr size_t kMaxStatusMessage = 4096;
// Elements of one generated tensor at most (keeps an execution cheap).
constexpr int64_t kMaxElements = 1 << 13;

[[noreturn]] void Fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "\n==== service_fuzz invariant violated: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

#define FUZZ_CHECK(cond, ...)       \
  do {                              \
    if (!(cond)) Fail(__VA_ARGS__); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The in-process server and a blocking generic client.

struct CallResult {
  grpc::Status status;
  std::vector<std::string> responses;
  bool cancelled = false;  // the input cancelled the call
};

// The server's parts: the session store and metrics as the real server builds them.
class ServerParts {
 public:
  ServerParts() {
    SessionStoreOptions o;
    o.limits.max_layers = kMaxLayers;
    o.limits.max_kv_heads = kMaxHeads;
    o.limits.max_q_heads = kMaxHeads;
    o.limits.max_head_dim = kMaxHeadDim;
    o.limits.max_obs_tokens = kMaxObsTokens;
    o.limits.max_session_bytes = kSessionBudget;
    o.host_budget_bytes = kHostBudget;
    o.tenant_budget_bytes = kTenantBudget;
    o.max_sessions = kMaxSessions;
    o.janitor_period = absl::ZeroDuration();  // no TTL evictions behind the model's back
    o.pruner_threads = 1;
    o.decode_threads = 1;  // split decode steps (merge path) without burning a spinning core
    o.decode_spin_us = 0;
    store_ = std::make_unique<SessionStore>(o);
    build_ = service::CurrentBuildInfo(store_->backend());
    metrics_ = std::make_unique<service::Metrics>(store_.get(), build_);
    limits_.max_message_bytes = kMaxMessageBytes;
    limits_.read_chunk_bytes = kReadChunkBytes;
  }

 protected:
  std::unique_ptr<SessionStore> store_;
  std::unique_ptr<service::Metrics> metrics_;
  service::BuildInfo build_;
  service::ServiceLimits limits_;
};

#ifndef SPARSEKV_FUZZ_DIRECT
// Through gRPC: the real KvCacheServiceImpl in an in-process grpc::Server, called through a
// GenericStub with raw bytes (service_fuzz).
class Harness : public ServerParts {
 public:
  Harness() {
    service_ = std::make_unique<service::KvCacheServiceImpl>(store_.get(), metrics_.get(), build_,
                                                             limits_);
    grpc::ServerBuilder builder;
    builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
    builder.SetMaxSendMessageSize(kMaxMessageBytes);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    FUZZ_CHECK(server_ != nullptr, "grpc::Server did not start");
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    stub_ = std::make_unique<grpc::GenericStub>(server_->InProcessChannel(args));
  }

  // One call of `m` with `msgs` (unary and server-streaming methods send msgs[0] only).
  CallResult Call(Method m, const std::vector<std::string>& msgs, bool cancel) {
    CallResult r;
    r.cancelled = cancel;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    const MethodInfo& mi = kMethods[m];
    if (mi.kind == Kind::kUnary) {
      grpc::ByteBuffer req = ToBuffer(msgs.empty() ? std::string() : msgs[0]);
      grpc::ByteBuffer resp;
      auto call = stub_->PrepareUnaryCall(&ctx, mi.path, req, &cq_);
      call->StartCall();
      if (cancel) ctx.TryCancel();
      call->Finish(&resp, &r.status, Tag(1));
      Wait(1);
      if (r.status.ok()) r.responses.push_back(ToString(resp));
      return r;
    }
    auto call = stub_->PrepareCall(&ctx, mi.path, &cq_);
    call->StartCall(Tag(1));
    bool alive = Wait(1);
    grpc::ByteBuffer buf;
    if (mi.kind == Kind::kBidi) {
      // One request, then its answer, as a client waiting for each reply would.
      for (size_t i = 0; alive && i < msgs.size(); ++i) {
        if (cancel && i == msgs.size() / 2) ctx.TryCancel();
        buf = ToBuffer(msgs[i]);
        call->Write(buf, Tag(2));
        if (!(alive = Wait(2))) break;
        call->Read(&buf, Tag(3));
        if (!(alive = Wait(3))) break;
        r.responses.push_back(ToString(buf));
      }
      if (cancel && msgs.empty()) ctx.TryCancel();
    } else {
      const size_t n =
          mi.kind == Kind::kServerStream ? std::min<size_t>(1, msgs.size()) : msgs.size();
      for (size_t i = 0; alive && i < n; ++i) {
        buf = ToBuffer(msgs[i]);
        call->Write(buf, Tag(2));
        alive = Wait(2);
      }
      if (mi.kind == Kind::kServerStream && msgs.empty()) {
        buf = ToBuffer(std::string());
        call->Write(buf, Tag(2));
        alive = Wait(2);
      }
      if (cancel && mi.kind == Kind::kClientStream) ctx.TryCancel();
    }
    if (alive) {
      call->WritesDone(Tag(4));
      Wait(4);
    }
    // Whatever the server still sends (every reply of a server stream, the response of a
    // client stream; nothing more for a bidi stream).
    for (int i = 0;; ++i) {
      if (cancel && mi.kind == Kind::kServerStream && i == 1) ctx.TryCancel();
      call->Read(&buf, Tag(5));
      if (!Wait(5)) break;
      r.responses.push_back(ToString(buf));
      FUZZ_CHECK(mi.kind != Kind::kBidi || cancel,
                 "DecodeStream sent a reply after the client's last request was answered");
    }
    call->Finish(&r.status, Tag(6));
    Wait(6);
    return r;
  }

  SessionStore& store() { return *store_; }

 private:
  static void* Tag(intptr_t t) { return reinterpret_cast<void*>(t); }

  bool Wait(intptr_t want) {
    void* got = nullptr;
    bool ok = false;
    FUZZ_CHECK(cq_.Next(&got, &ok), "completion queue shut down");
    FUZZ_CHECK(got == Tag(want), "completion queue returned tag %ld, expected %ld",
               static_cast<long>(reinterpret_cast<intptr_t>(got)), static_cast<long>(want));
    return ok;
  }

  static grpc::ByteBuffer ToBuffer(const std::string& s) {
    grpc::Slice slice(s);
    return grpc::ByteBuffer(&slice, 1);
  }

  static std::string ToString(const grpc::ByteBuffer& b) {
    std::vector<grpc::Slice> slices;
    std::string out;
    if (!b.Dump(&slices).ok()) return out;
    for (const grpc::Slice& s : slices) {
      out.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
    return out;
  }

  std::unique_ptr<service::KvCacheServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::GenericStub> stub_;
  grpc::CompletionQueue cq_;
};

#else
// Without a transport: the same request logic (service/handlers.h) called directly with the
// bytes a client would send, parsed the way the gRPC service parses them (request_fuzz). The
// statuses and responses are the ones the gRPC reactors would send; a cancelled call stops
// at a fixed point (unary: before the handler; client streams: after half of the messages;
// DecodeStream: after half of the requests; server streams: after the first message) and
// reports CANCELLED, as the client of a cancelled gRPC call sees it.
class Harness : public ServerParts {
 public:
  Harness() : h_(store_.get(), metrics_.get(), build_, limits_) {}

  CallResult Call(Method m, const std::vector<std::string>& msgs, bool cancel) {
    CallResult r;
    r.cancelled = cancel;
    const std::string_view first = msgs.empty() ? std::string_view() : msgs[0];
    const size_t sent = cancel ? msgs.size() / 2 : msgs.size();
    absl::Status st;
    switch (m) {
      case kCreateSession:
        st = Unary<v1::CreateSessionRequest, v1::Session>(
            first, cancel, &r,
            [&](const auto& q, auto* o) { return h_.CreateSession(kCaller, q, {}, o); });
        break;
      case kGetSession:
        st = Unary<v1::GetSessionRequest, v1::Session>(
            first, cancel, &r,
            [&](const auto& q, auto* o) { return h_.GetSession(kCaller, q, o); });
        break;
      case kListSessions:
        st = Unary<v1::ListSessionsRequest, v1::ListSessionsResponse>(
            first, cancel, &r,
            [&](const auto& q, auto* o) { return h_.ListSessions(kCaller, q, o); });
        break;
      case kDeleteSession:
        st = Unary<v1::DeleteSessionRequest, v1::DeleteSessionResponse>(
            first, cancel, &r,
            [&](const auto& q, auto* o) { return h_.DeleteSession(kCaller, q, o); });
        break;
      case kDecode:
        st = Unary<v1::DecodeRequest, v1::DecodeResponse>(
            first, cancel, &r,
            [&](const auto& q, auto* o) { return h_.Decode(kCaller, q, {}, o); });
        break;
      case kFlush:
        st = Unary<v1::FlushRequest, v1::FlushResponse>(
            first, cancel, &r, [&](const auto& q, auto* o) -> absl::Status {
              absl::StatusOr<std::shared_ptr<Session>> s = h_.FlushTarget(kCaller, q, {});
              if (!s.ok()) return s.status();
              service::Handlers::FlushNow(**s, o);
              return absl::OkStatus();
            });
        break;
      case kGetServerInfo:
        st = Unary<v1::GetServerInfoRequest, v1::ServerInfo>(first, cancel, &r,
                                                             [&](const auto&, auto* o) {
                                                               h_.ServerInfo(o);
                                                               return absl::OkStatus();
                                                             });
        break;
      case kAppendKV: {
        service::AppendCall call(&h_, kCaller);
        v1::AppendKVRequest req;
        for (size_t i = 0; st.ok() && i < sent; ++i) {
          const absl::Status parsed =
              service::ParseMessage(msgs[i], &req, service::StreamMessage(call.messages()));
          st = call.Take(parsed, req, {});
        }
        if (st.ok() && !cancel) {
          v1::AppendKVResponse out;
          st = call.Finish(&out);
          if (st.ok()) r.responses.push_back(out.SerializeAsString());
        }
        break;
      }
      case kDecodeStream: {
        v1::DecodeRequest req;
        v1::DecodeResponse out;
        for (size_t i = 0; i < sent; ++i) {
          const absl::Status parsed =
              service::ParseMessage(msgs[i], &req, service::StreamMessage(i));
          if (!parsed.ok()) {
            st = service::Handlers::DecodeStreamBroken(parsed, static_cast<int64_t>(i));
            break;
          }
          h_.DecodeStreamMessage(kCaller, req, &out);
          r.responses.push_back(out.SerializeAsString());
        }
        break;
      }
      case kReadKV:
        st = ServerStream<v1::ReadKVRequest, service::ReadCall, v1::ReadKVResponse>(first, cancel,
                                                                                    &r);
        break;
      case kExportSession:
        st = ServerStream<v1::ExportSessionRequest, service::ExportCall, v1::SessionChunk>(
            first, cancel, &r);
        break;
      case kImportSession: {
        service::ImportCall call(&h_, kCaller);
        v1::SessionChunk piece;
        size_t i = 0;
        for (; st.ok() && !call.complete() && i < sent; ++i) {
          const absl::Status parsed =
              service::ParseMessage(msgs[i], &piece, service::StreamMessage(call.pieces()));
          st = call.Take(parsed, piece);
        }
        if (st.ok() && !cancel) {
          if (call.complete()) {
            v1::Session out;
            st = call.Finish(&out);
            if (st.ok()) r.responses.push_back(out.SerializeAsString());
          } else {
            st = call.EndedEarly();
          }
        }
        break;
      }
      default:
        Fail("unknown method %d", static_cast<int>(m));
    }
    r.status = cancel ? grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client")
                      : service::ToGrpcStatus(st);
    if (!r.status.ok() && kMethods[m].kind == Kind::kUnary) r.responses.clear();
    return r;
  }

  SessionStore& store() { return *store_; }

 private:
  // Parses `bytes` as Request and runs `body`; a cancelled call runs nothing.
  template <typename Request, typename Response, typename Body>
  static absl::Status Unary(std::string_view bytes, bool cancel, CallResult* r, Body body) {
    if (cancel) return absl::CancelledError("cancelled by the client");
    Request req;
    Response out;
    SPARSEKV_RETURN_IF_ERROR(service::ParseMessage(bytes, &req, ""));
    SPARSEKV_RETURN_IF_ERROR(body(req, &out));
    r->responses.push_back(out.SerializeAsString());
    return absl::OkStatus();
  }

  // Parses `bytes` as Request, starts the call and collects its messages; a cancelled call
  // stops after the first.
  template <typename Request, typename Call, typename Message>
  absl::Status ServerStream(std::string_view bytes, bool cancel, CallResult* r) {
    Request req;
    SPARSEKV_RETURN_IF_ERROR(service::ParseMessage(bytes, &req, ""));
    SPARSEKV_ASSIGN_OR_RETURN(std::unique_ptr<Call> call, Call::Start(&h_, kCaller, req));
    Message out;
    absl::Status st;
    while (call->Next(&out, &st)) {
      r->responses.push_back(out.SerializeAsString());
      if (cancel) break;
    }
    return st;
  }

  // The fuzzer runs as --auth=none does (tests/service/auth_test.cc covers tenants).
  const service::Caller kCaller = service::Caller::NoAuth();
  service::Handlers h_;
};
#endif

Harness* harness = nullptr;

// ---------------------------------------------------------------------------------------------
// Status checks.

const char* CodeName(grpc::StatusCode c) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int i = static_cast<int>(c);
  return i >= 0 && i < 17 ? kNames[i] : "?";
}

// A status any RPC may end with.
void CheckCode(Method m, int code, const std::string& message, bool cancelled) {
  const auto c = static_cast<grpc::StatusCode>(code);
  switch (c) {
    case grpc::StatusCode::OK:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::FAILED_PRECONDITION:
      break;
    case grpc::StatusCode::CANCELLED:
      FUZZ_CHECK(cancelled, "%s returned CANCELLED, but the client did not cancel: %s",
                 kMethods[m].name, message.c_str());
      break;
    case grpc::StatusCode::DATA_LOSS:  // a damaged snapshot stream
      FUZZ_CHECK(m == kImportSession, "%s returned DATA_LOSS: %s", kMethods[m].name,
                 message.c_str());
      break;
    default:
      Fail("%s returned %s (%d): %s", kMethods[m].name, CodeName(c), code, message.c_str());
  }
  FUZZ_CHECK(message.size() <= kMaxStatusMessage, "%s returned a %zu-byte status message",
             kMethods[m].name, message.size());
}

void CheckStatus(Method m, const CallResult& r) {
  CheckCode(m, r.status.error_code(), r.status.error_message(), r.cancelled);
}

// Parses `bytes` as a T, or fails naming `what`.
template <typename T>
T MustParse(const std::string& bytes, const char* what) {
  T msg;
  FUZZ_CHECK(msg.ParseFromString(bytes), "%s: response (%zu bytes) does not parse as %s", what,
             bytes.size(), T::descriptor()->full_name().c_str());
  return msg;
}

// Calls `m` and checks the status; aborts on a status no RPC may return.
CallResult Call(Method m, const std::vector<std::string>& msgs, bool cancel = false) {
  CallResult r = harness->Call(m, msgs, cancel);
  CheckStatus(m, r);
  return r;
}

template <typename Request>
CallResult CallOne(Method m, const Request& req, bool cancel = false) {
  return Call(m, {req.SerializeAsString()}, cancel);
}

// ---------------------------------------------------------------------------------------------
// Server-wide invariants, and cleanup between inputs.

v1::ServerInfo GetInfo() {
  CallResult r = Call(kGetServerInfo, {std::string()});
  FUZZ_CHECK(r.status.ok(), "GetServerInfo failed: %s", r.status.error_message().c_str());
  FUZZ_CHECK(r.responses.size() == 1, "GetServerInfo: %zu responses", r.responses.size());
  return MustParse<v1::ServerInfo>(r.responses[0], "GetServerInfo");
}

std::vector<v1::Session> ListAll() {
  std::vector<v1::Session> out;
  v1::ListSessionsRequest req;
  req.set_page_size(1000);
  for (int page = 0; page < 100; ++page) {
    CallResult r = CallOne(kListSessions, req);
    FUZZ_CHECK(r.status.ok(), "ListSessions failed: %s", r.status.error_message().c_str());
    auto resp = MustParse<v1::ListSessionsResponse>(r.responses.at(0), "ListSessions");
    for (const v1::Session& s : resp.sessions()) out.push_back(s);
    if (resp.next_page_token().empty()) return out;
    FUZZ_CHECK(resp.next_page_token() > req.page_token(), "ListSessions page token went back");
    req.set_page_token(resp.next_page_token());
  }
  Fail("ListSessions did not end after 100 pages");
}

// host_bytes_used is the sum of the live sessions' bytes_accounted. Background compression
// may change both between the calls, so it is retried until two reads agree (for up to ~2 s).
void CheckAccounting() {
  uint64_t used = 0, sum = 0, sessions = 0;
  size_t listed = 0;
  for (int attempt = 0; attempt < 400; ++attempt) {
    const v1::ServerInfo a = GetInfo();
    const std::vector<v1::Session> all = ListAll();
    const v1::ServerInfo b = GetInfo();
    used = a.host_bytes_used();
    sessions = a.sessions();
    listed = all.size();
    sum = 0;
    for (const v1::Session& s : all) sum += s.stats().bytes_accounted();
    if (a.host_bytes_used() == b.host_bytes_used() && a.sessions() == b.sessions()) {
      if (used == sum && sessions == listed) {
        FUZZ_CHECK(used <= 2 * static_cast<uint64_t>(kHostBudget),
                   "host_bytes_used %llu is far over the %lld-byte budget",
                   static_cast<unsigned long long>(used), static_cast<long long>(kHostBudget));
        return;
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(attempt < 10 ? 100 : 5000));
  }
  Fail(
      "host_bytes_used %llu != sum of bytes_accounted %llu over %zu listed sessions "
      "(ServerInfo.sessions %llu)",
      static_cast<unsigned long long>(used), static_cast<unsigned long long>(sum), listed,
      static_cast<unsigned long long>(sessions));
}

// Deletes every session, then checks that the budget holds nothing.
void DeleteAllAndCheckEmpty() {
  for (const v1::Session& s : ListAll()) {
    v1::DeleteSessionRequest req;
    req.set_session_id(s.id());
    CallResult r = CallOne(kDeleteSession, req);
    FUZZ_CHECK(r.status.ok(), "DeleteSession of listed session failed: %s",
               r.status.error_message().c_str());
  }
  for (int attempt = 0;; ++attempt) {
    const v1::ServerInfo info = GetInfo();
    if (info.sessions() == 0 && info.host_bytes_used() == 0) return;
    FUZZ_CHECK(attempt < 400, "after deleting every session: %llu sessions, host_bytes_used %llu",
               static_cast<unsigned long long>(info.sessions()),
               static_cast<unsigned long long>(info.host_bytes_used()));
    std::this_thread::sleep_for(std::chrono::microseconds(attempt < 10 ? 100 : 5000));
  }
}

// ---------------------------------------------------------------------------------------------
// Input reading.

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : p_(data), end_(data + size) {}
  bool empty() const { return p_ == end_; }
  size_t left() const { return static_cast<size_t>(end_ - p_); }
  uint8_t Byte() { return p_ < end_ ? *p_++ : 0; }
  uint8_t Peek() const { return p_ < end_ ? *p_ : 0; }
  int Pick(int n) { return Byte() % n; }
  uint16_t U16() {
    const uint16_t lo = Byte();
    return static_cast<uint16_t>(lo | (Byte() << 8));
  }
  std::string Bytes(size_t n) {
    n = std::min(n, left());
    std::string s(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return s;
  }
  // The next `len` (a byte) bytes as their own reader.
  Reader Slice() {
    const size_t n = std::min<size_t>(Byte(), left());
    Reader r(p_, n);
    p_ += n;
    return r;
  }
  template <typename T, size_t N>
  const T& From(const T (&table)[N]) {
    return table[Pick(static_cast<int>(N))];
  }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

// ---------------------------------------------------------------------------------------------
// Raw mode.

template <typename Request>
bool Parses(const std::string& bytes) {
  Request r;
  return r.ParseFromString(bytes);
}

bool RequestParses(Method m, const std::string& bytes) {
  switch (m) {
    case kCreateSession:
      return Parses<v1::CreateSessionRequest>(bytes);
    case kGetSession:
      return Parses<v1::GetSessionRequest>(bytes);
    case kListSessions:
      return Parses<v1::ListSessionsRequest>(bytes);
    case kDeleteSession:
      return Parses<v1::DeleteSessionRequest>(bytes);
    case kAppendKV:
      return Parses<v1::AppendKVRequest>(bytes);
    case kDecode:
    case kDecodeStream:
      return Parses<v1::DecodeRequest>(bytes);
    case kFlush:
      return Parses<v1::FlushRequest>(bytes);
    case kReadKV:
      return Parses<v1::ReadKVRequest>(bytes);
    case kExportSession:
      return Parses<v1::ExportSessionRequest>(bytes);
    case kImportSession:
      return Parses<v1::SessionChunk>(bytes);
    case kGetServerInfo:
      return Parses<v1::GetServerInfoRequest>(bytes);
    default:
      return false;
  }
}

void CheckResponseParses(Method m, const std::string& bytes) {
  switch (m) {
    case kCreateSession:
    case kGetSession:
    case kImportSession:
      MustParse<v1::Session>(bytes, kMethods[m].name);
      break;
    case kListSessions:
      MustParse<v1::ListSessionsResponse>(bytes, kMethods[m].name);
      break;
    case kDeleteSession:
      MustParse<v1::DeleteSessionResponse>(bytes, kMethods[m].name);
      break;
    case kAppendKV:
      MustParse<v1::AppendKVResponse>(bytes, kMethods[m].name);
      break;
    case kDecode:
    case kDecodeStream:
      MustParse<v1::DecodeResponse>(bytes, kMethods[m].name);
      break;
    case kFlush:
      MustParse<v1::FlushResponse>(bytes, kMethods[m].name);
      break;
    case kReadKV:
      MustParse<v1::ReadKVResponse>(bytes, kMethods[m].name);
      break;
    case kExportSession:
      MustParse<v1::SessionChunk>(bytes, kMethods[m].name);
      break;
    case kGetServerInfo:
      MustParse<v1::ServerInfo>(bytes, kMethods[m].name);
      break;
    default:
      break;
  }
}

// Runs one raw op from `in`; returns whether a CreateSession succeeded.
bool RunRawOp(Reader& in) {
  const uint8_t op = in.Byte();
  const Method m = static_cast<Method>((op & 0x0f) % kNumMethods);
  const bool cancel = (op & kFlagCancel) != 0;
  const Kind kind = kMethods[m].kind;
  std::vector<std::string> msgs;
  if (kind == Kind::kUnary || kind == Kind::kServerStream) {
    msgs.push_back(in.Bytes(in.U16()));
  } else {
    const int n = in.Byte() % (kMaxStreamMessages + 1);
    for (int i = 0; i < n; ++i) msgs.push_back(in.Bytes(in.U16()));
  }
  const CallResult r = Call(m, msgs, cancel);
  const grpc::StatusCode code = r.status.error_code();
  for (const std::string& resp : r.responses) CheckResponseParses(m, resp);
  if (cancel) return m == kCreateSession || m == kImportSession;
  // How the service's parser answered bytes that do not parse.
  size_t first_bad = msgs.size();
  for (size_t i = 0; i < msgs.size(); ++i) {
    if (!RequestParses(m, msgs[i])) {
      first_bad = i;
      break;
    }
  }
  switch (kind) {
    case Kind::kUnary:
    case Kind::kServerStream:
      if (first_bad == 0) {
        FUZZ_CHECK(code == grpc::StatusCode::INVALID_ARGUMENT,
                   "%s with bytes that do not parse returned %s: %s", kMethods[m].name,
                   CodeName(code), r.status.error_message().c_str());
      }
      if (kind == Kind::kUnary && code == grpc::StatusCode::OK) {
        FUZZ_CHECK(r.responses.size() == 1, "%s returned OK without a response", kMethods[m].name);
      }
      break;
    case Kind::kClientStream:
      if (first_bad < msgs.size() || msgs.empty()) {
        FUZZ_CHECK(code != grpc::StatusCode::OK,
                   "%s stream with message %zu of %zu unparseable (or none) returned OK",
                   kMethods[m].name, first_bad + 1, msgs.size());
      }
      if (code == grpc::StatusCode::OK) {
        FUZZ_CHECK(r.responses.size() == 1, "%s returned OK with %zu responses", kMethods[m].name,
                   r.responses.size());
      }
      break;
    case Kind::kBidi:
      if (first_bad < msgs.size()) {
        FUZZ_CHECK(code == grpc::StatusCode::INVALID_ARGUMENT && r.responses.size() == first_bad,
                   "DecodeStream with message %zu unparseable: %s after %zu replies: %s",
                   first_bad + 1, CodeName(code), r.responses.size(),
                   r.status.error_message().c_str());
      } else {
        FUZZ_CHECK(code == grpc::StatusCode::OK && r.responses.size() == msgs.size(),
                   "DecodeStream of %zu parseable requests: %s after %zu replies: %s", msgs.size(),
                   CodeName(code), r.responses.size(), r.status.error_message().c_str());
      }
      for (size_t i = 0; i < r.responses.size(); ++i) {
        v1::DecodeRequest req;
        req.ParseFromString(msgs[i]);
        auto resp = MustParse<v1::DecodeResponse>(r.responses[i], "DecodeStream");
        FUZZ_CHECK(resp.request_id() == req.request_id(),
                   "DecodeStream reply %zu has request_id %llu, request had %llu", i,
                   static_cast<unsigned long long>(resp.request_id()),
                   static_cast<unsigned long long>(req.request_id()));
        CheckCode(kDecodeStream, resp.error_code(), resp.error_message(), false);
        if (resp.error_code() == 0) {
          FUZZ_CHECK(resp.results_size() == req.items_size(),
                     "DecodeStream reply %zu: %d results for %d items", i, resp.results_size(),
                     req.items_size());
        }
      }
      break;
  }
  if (m == kDecode && code == grpc::StatusCode::OK) {
    v1::DecodeRequest req;
    req.ParseFromString(msgs[0]);
    auto resp = MustParse<v1::DecodeResponse>(r.responses[0], "Decode");
    FUZZ_CHECK(resp.results_size() == req.items_size(), "Decode: %d results for %d items",
               resp.results_size(), req.items_size());
  }
  return (m == kCreateSession || m == kImportSession) && code == grpc::StatusCode::OK;
}

v1::CreateSessionRequest PresetRequest(const Preset& p) {
  v1::CreateSessionRequest req;
  req.set_session_id(kPresetId);
  v1::Layout* l = req.mutable_layout();
  l->set_num_layers(p.layers);
  l->set_num_kv_heads(p.kv_heads);
  l->set_num_q_heads(p.q_heads);
  l->set_head_dim(p.head_dim);
  l->set_dtype(static_cast<v1::DType>(p.dtype));
  v1::Policy* pol = req.mutable_policy();
  pol->mutable_k()->set_sparsity(p.k_sparsity);
  pol->mutable_k()->set_direction(static_cast<v1::PruneDirection>(p.k_direction));
  pol->mutable_k()->set_scoring(static_cast<v1::Scoring>(p.k_scoring));
  pol->mutable_v()->set_sparsity(p.v_sparsity);
  pol->mutable_v()->set_direction(static_cast<v1::PruneDirection>(p.v_direction));
  pol->mutable_v()->set_scoring(static_cast<v1::Scoring>(p.v_scoring));
  pol->set_dense_window(p.dense_window);
  pol->set_chunk_tokens(p.chunk_tokens);
  pol->set_group_tokens(p.group_tokens);
  pol->set_decode_compute(static_cast<v1::DecodeCompute>(p.decode_compute));
  return req;
}

// Returns whether sessions may exist afterwards.
bool RunRaw(Reader& in) {
  bool created = false;
  const uint8_t preset = in.Byte();
  if (preset < kNumPresets) {
    CallResult r = CallOne(kCreateSession, PresetRequest(kPresets[preset]));
    FUZZ_CHECK(r.status.ok(), "CreateSession of preset %d failed: %s", preset,
               r.status.error_message().c_str());
    created = true;
  }
  for (int ops = 0; ops < 16 && !in.empty(); ++ops) created |= RunRawOp(in);
  return created;
}

// ---------------------------------------------------------------------------------------------
// Structured mode: tensors.

struct Rng {
  uint64_t s;
  uint64_t Next() {  // splitmix64
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float Small() {  // uniform in [-2, 2)
    return static_cast<float>(static_cast<double>(Next() >> 40) / (1ull << 24) * 4.0 - 2.0);
  }
};

// Value classes: 0, 1 and 8 keep every value small (|x| <= 2); the others add an extreme.
enum ValueClass {
  kSmall,
  kZeros,
  kNaN,
  kPosInf,
  kNegInf,
  kHalfMax,
  kHalfOverflow,
  kHuge,
  kTiny,
  kLarge,
  kAllHuge,
  kNumValueClasses
};

bool IsSmallClass(int c) { return c == kSmall || c == kZeros || c == kTiny; }

struct TensorFacts {
  bool nonfinite = false;      // NaN or Inf after encoding in the tensor's dtype
  bool overflows_f16 = false;  // a finite value that an fp16 cache cannot hold
  bool small = true;           // every value |x| <= 2 (and not mutated)
  bool valid = true;           // shape, dtype and byte length consistent (as far as we know)
};

// Encodes `n` values of class `cls` into `t` with dtype `dtype` (a sparsekv.v1.DType value;
// unknown ones are encoded as fp32).
void FillValues(v1::Tensor* t, int dtype, int64_t n, int cls, Rng& rng, TensorFacts* f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = cls == kZeros ? 0.0f : rng.Small();
  if (n > 0 && !IsSmallClass(cls)) {
    const size_t at = static_cast<size_t>(rng.Next() % static_cast<uint64_t>(n));
    switch (cls) {
      case kNaN:
        v[at] = std::nanf("");
        break;
      case kPosInf:
        v[at] = INFINITY;
        break;
      case kNegInf:
        v[at] = -INFINITY;
        break;
      case kHalfMax:
        v[at] = 65504.0f;
        break;
      case kHalfOverflow:
        v[at] = -70000.0f;
        break;
      case kHuge:
        v[at] = 3e38f;
        break;
      case kLarge:
        for (float& x : v) x *= 5000.0f;
        break;
      case kAllHuge:
        for (float& x : v) x = (x < 0 ? -1e30f : 1e30f);
        break;
      default:
        break;
    }
    f->small = false;
  }
  if (cls == kTiny && n > 0) {
    v[rng.Next() % static_cast<uint64_t>(n)] = 1e-40f;
    v[rng.Next() % static_cast<uint64_t>(n)] = -0.0f;
  }
  std::string* data = t->mutable_data();
  if (dtype == v1::DTYPE_FLOAT16 || dtype == v1::DTYPE_BFLOAT16) {
    data->resize(static_cast<size_t>(n) * 2);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t h =
          dtype == v1::DTYPE_FLOAT16 ? kernels::FloatToHalf(v[i]) : kernels::FloatToBFloat16(v[i]);
      std::memcpy(data->data() + 2 * i, &h, 2);
      const float back =
          dtype == v1::DTYPE_FLOAT16 ? kernels::HalfToFloat(h) : kernels::BFloat16ToFloat(h);
      if (!std::isfinite(back)) f->nonfinite = true;
      if (std::fabs(back) >= 65520.0f) f->overflows_f16 = true;
    }
  } else {
    data->resize(static_cast<size_t>(n) * 4);
    std::memcpy(data->data(), v.data(), static_cast<size_t>(n) * 4);
    for (float x : v) {
      if (!std::isfinite(x)) f->nonfinite = true;
      if (std::fabs(x) >= 65520.0f) f->overflows_f16 = true;
    }
  }
}

// Shape and byte-length mutations of a tensor whose correct shape is `shape`.
enum ShapeMut {
  kShapeOk,
  kShapeHeads,
  kShapeDim,
  kShapeRank,
  kShapeZero,
  kShapeNeg,
  kShapeHuge,
  kShapeNineDims,
  kNumShapeMuts
};
enum ByteMut { kBytesOk, kBytesShort, kBytesLong, kBytesEmpty, kNumByteMuts };

// Builds a tensor of `shape` (row-major) with `dtype`, then mutates its shape and bytes.
// `heads_axis` is the index of the heads dimension (the one after it is head_dim).
TensorFacts BuildTensor(v1::Tensor* t, int dtype, std::vector<int64_t> shape, int heads_axis,
                        int shape_mut, int byte_mut, int cls, Rng& rng) {
  TensorFacts f;
  t->Clear();
  t->set_dtype(static_cast<v1::DType>(dtype));
  if (dtype != v1::DTYPE_FLOAT32 && dtype != v1::DTYPE_FLOAT16 && dtype != v1::DTYPE_BFLOAT16) {
    f.valid = false;
  }
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  FillValues(t, dtype, n, cls, rng, &f);
  switch (shape_mut) {
    case kShapeHeads:
      shape[heads_axis] += 1;
      f.valid = false;
      break;
    case kShapeDim:
      shape[heads_axis + 1] = shape[heads_axis + 1] > 1 ? shape[heads_axis + 1] - 1 : 2;
      f.valid = false;
      break;
    case kShapeRank:
      shape.insert(shape.begin(), 1);
      f.valid = false;
      break;
    case kShapeZero:
      shape[0] = 0;
      f.valid = false;
      break;
    case kShapeNeg:
      shape.back() = -shape.back();
      f.valid = false;
      break;
    case kShapeHuge:
      shape[0] = int64_t{1} << 40;
      f.valid = false;
      break;
    case kShapeNineDims:
      shape.resize(9, 1);
      f.valid = false;
      break;
    default:
      break;
  }
  for (int64_t d : shape) t->add_shape(d);
  std::string* data = t->mutable_data();
  switch (byte_mut) {
    case kBytesShort:
      if (!data->empty()) data->pop_back();
      f.valid = false;
      break;
    case kBytesLong:
      data->append("\x01\x02", 2);
      f.valid = false;
      break;
    case kBytesEmpty:
      data->clear();
      f.valid = false;
      break;
    default:
      break;
  }
  if (!f.valid) f.small = false;
  return f;
}

// Decodes a response tensor's values; false when dtype, shape or length are inconsistent.
bool TensorValues(const v1::Tensor& t, std::vector<float>* out) {
  int64_t n = 1;
  for (int64_t d : t.shape()) n *= d;
  const std::string& d = t.data();
  out->clear();
  if (t.dtype() == v1::DTYPE_FLOAT32) {
    if (static_cast<int64_t>(d.size()) != 4 * n) return false;
    out->resize(static_cast<size_t>(n));
    std::memcpy(out->data(), d.data(), d.size());
    return true;
  }
  if (t.dtype() == v1::DTYPE_FLOAT16 || t.dtype() == v1::DTYPE_BFLOAT16) {
    if (static_cast<int64_t>(d.size()) != 2 * n) return false;
    out->resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, d.data() + 2 * i, 2);
      (*out)[i] =
          t.dtype() == v1::DTYPE_FLOAT16 ? kernels::HalfToFloat(h) : kernels::BFloat16ToFloat(h);
    }
    return true;
  }
  return false;
}

bool AllFinite(const std::vector<float>& v) {
  for (float x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Structured mode: the model.

struct SessionModel {
  std::string id;
  bool live = false;
  int layers = 0, kv = 0, q = 0, dim = 0;
  int dtype = v1::DTYPE_FLOAT16;  // storage
  // Some stored value may be large: decode outputs are then not required to be finite.
  bool extreme = false;
  std::vector<int64_t> tokens;
};

struct World {
  std::vector<SessionModel> sessions;
  Rng rng{0};
  bool raw_touched = false;  // a raw op may have changed sessions behind the model
};

SessionModel* FindLive(World& w, const std::string& id) {
  for (SessionModel& s : w.sessions) {
    if (s.live && s.id == id) return &s;
  }
  return nullptr;
}

// Index choice: < sessions.size() picks that session, else an unknown id.
const SessionModel* PickSession(World& w, Reader& in, std::string* id) {
  const int i = in.Pick(static_cast<int>(w.sessions.size()) + 1);
  if (i < static_cast<int>(w.sessions.size())) {
    *id = w.sessions[i].id;
    return FindLive(w, *id);
  }
  *id = "no-such-session";
  return nullptr;
}

std::string TokensString(const std::vector<int64_t>& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.size(); ++i) s += (i ? ", " : "") + std::to_string(t[i]);
  return s + "]";
}

// What the server accepts as a session id: 1..128 characters of [A-Za-z0-9._:-].
bool ValidId(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
          c == '-')) {
      return false;
    }
  }
  return true;
}

// Fetches a session; NOT_FOUND (or INVALID_ARGUMENT for a malformed id) gives false.
bool FetchSession(const std::string& id, v1::Session* out) {
  v1::GetSessionRequest req;
  req.set_session_id(id);
  CallResult r = CallOne(kGetSession, req);
  if (r.status.error_code() == grpc::StatusCode::NOT_FOUND) return false;
  if (r.status.error_code() == grpc::StatusCode::INVALID_ARGUMENT && !ValidId(id)) return false;
  FUZZ_CHECK(r.status.ok(), "GetSession(%s) failed: %s", id.c_str(),
             r.status.error_message().c_str());
  *out = MustParse<v1::Session>(r.responses.at(0), "GetSession");
  return true;
}

std::vector<int64_t> StatsTokens(const v1::SessionStats& st) {
  return std::vector<int64_t>(st.tokens_per_layer().begin(), st.tokens_per_layer().end());
}

void CheckStats(const SessionModel& m, const v1::SessionStats& st, const char* where) {
  const std::vector<int64_t> got = StatsTokens(st);
  FUZZ_CHECK(got == m.tokens, "%s: session %s has tokens_per_layer %s, model %s", where,
             m.id.c_str(), TokensString(got).c_str(), TokensString(m.tokens).c_str());
  uint64_t total = 0;
  for (int64_t t : m.tokens) total += static_cast<uint64_t>(t);
  FUZZ_CHECK(st.tokens_total() == total, "%s: tokens_total %llu != %llu", where,
             static_cast<unsigned long long>(st.tokens_total()),
             static_cast<unsigned long long>(total));
  FUZZ_CHECK(st.bytes_accounted() >= st.bytes_dense() + st.bytes_compressed(),
             "%s: bytes_accounted %llu < bytes_dense %llu + bytes_compressed %llu", where,
             static_cast<unsigned long long>(st.bytes_accounted()),
             static_cast<unsigned long long>(st.bytes_dense()),
             static_cast<unsigned long long>(st.bytes_compressed()));
}

// Checks every live session against the model; with `check` false (after a raw op or a
// cancelled call, which may have changed sessions behind the model's back) adopts the server's
// view instead, sessions the model did not know included.
void SyncModel(World& w, bool check) {
  if (!check) {
    for (SessionModel& m : w.sessions) m.live = false;
    for (const v1::Session& s : ListAll()) {
      SessionModel m;
      m.id = s.id();
      m.live = true;
      m.layers = static_cast<int>(s.layout().num_layers());
      m.kv = static_cast<int>(s.layout().num_kv_heads());
      m.q = static_cast<int>(s.layout().num_q_heads());
      m.dim = static_cast<int>(s.layout().head_dim());
      m.dtype = s.layout().dtype();
      m.extreme = true;
      m.tokens = StatsTokens(s.stats());
      FUZZ_CHECK(m.layers >= 1 && m.layers <= kMaxLayers &&
                     m.tokens.size() == static_cast<size_t>(m.layers),
                 "session %s: %d layers, %zu tokens_per_layer", m.id.c_str(), m.layers,
                 m.tokens.size());
      bool known = false;
      for (SessionModel& old : w.sessions) {
        if (old.id == m.id && !known) {
          old = m;
          known = true;
        }
      }
      if (!known && w.sessions.size() < 8) w.sessions.push_back(m);
    }
    return;
  }
  for (SessionModel& m : w.sessions) {
    if (!m.live) continue;
    v1::Session s;
    FUZZ_CHECK(FetchSession(m.id, &s), "session %s vanished", m.id.c_str());
    CheckStats(m, s.stats(), "GetSession");
  }
}

// After a call the input cancelled: the client sees CANCELLED at once, but the server may
// still be applying a message it had read (nothing tells the client when it is done). Waits
// until the sessions' token counts stop changing, then adopts them.
void SettleAfterCancel(World& w) {
#ifndef SPARSEKV_FUZZ_DIRECT  // the direct driver's cancelled call has already stopped
  std::vector<int64_t> prev;
  for (int attempt = 0; attempt < 200; ++attempt) {
    std::vector<int64_t> now;
    for (const v1::Session& s : ListAll()) {
      for (uint64_t t : s.stats().tokens_per_layer()) now.push_back(static_cast<int64_t>(t));
      now.push_back(-1);
    }
    if (attempt > 0 && now == prev) break;
    prev = std::move(now);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
#endif
  SyncModel(w, /*check=*/false);
}

// ---------------------------------------------------------------------------------------------
// Structured mode: CreateSession.

constexpr int kLayersTable[] = {2, 1, 3, 4, 0, 5};
constexpr int kKvTable[] = {2, 1, 4, 8, 3, 0, 9};
constexpr int kQMultTable[] = {2, 1, 4, 3, -1};  // -1: not a multiple
constexpr int kDimTable[] = {32, 16, 64, 128, 8, 1, 3, 31, 129, 0};
constexpr int kLayoutDTypeTable[] = {v1::DTYPE_FLOAT16, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT32,
                                     v1::DTYPE_UNSPECIFIED, 7};
constexpr float kSparsityTable[] = {0.5f, 0.0f, 0.7f, 0.3f, 0.9f, 0.999f, -0.1f, 1.0f, NAN};
constexpr int kDirectionTable[] = {0, 1, 2, 5};
constexpr int kScoringTable[] = {0, 1, 2, 9};
constexpr uint32_t kDenseWindowTable[] = {4, 0, 1, 32, 100, 70000};
constexpr uint32_t kChunkTable[] = {32, 0, 64, 96, 33, 8192, 9000};
constexpr uint32_t kGroupTable[] = {0, 32, 64, 48};
constexpr int kComputeTable[] = {0, 1, 2, 3};
constexpr uint64_t kTtlTable[] = {0, 60, 1000000000000ull};

void ReadTensorPolicy(Reader& in, int layers, v1::TensorPolicy* p) {
  p->set_sparsity(in.From(kSparsityTable));
  p->set_direction(static_cast<v1::PruneDirection>(in.From(kDirectionTable)));
  p->set_scoring(static_cast<v1::Scoring>(in.From(kScoringTable)));
  switch (in.Pick(4)) {
    case 1:
      for (int l = 0; l < layers; ++l) p->add_layer_sparsity(kSparsityTable[(l * 3) % 6]);
      break;
    case 2:
      for (int l = 0; l <= layers; ++l) p->add_layer_sparsity(0.5f);
      break;
    case 3:
      for (int l = 0; l < layers; ++l) p->add_layer_sparsity(l == 0 ? NAN : 0.5f);
      break;
    default:
      break;
  }
}

// Reads a create spec (choices in this order) and creates session number `index`.
void RunCreate(World& w, Reader in) {
  const int index = static_cast<int>(w.sessions.size());
  if (index >= 4) return;
  v1::CreateSessionRequest req;
  std::string id = "s" + std::to_string(index);
  switch (in.Pick(5)) {
    case 1:
      id.clear();
      break;  // server-generated
    case 2:
      id = "bad id!";
      break;
    case 3:
      id = std::string(200, 'x');
      break;
    case 4:
      id = "s0";
      break;  // duplicate when s0 lives
    default:
      break;
  }
  req.set_session_id(id);
  const int layers = in.From(kLayersTable);
  const int kv = in.From(kKvTable);
  const int qmult = in.From(kQMultTable);
  v1::Layout* l = req.mutable_layout();
  l->set_num_layers(layers);
  l->set_num_kv_heads(kv);
  l->set_num_q_heads(qmult < 0 ? kv + 1 : kv * qmult);
  l->set_head_dim(in.From(kDimTable));
  l->set_dtype(static_cast<v1::DType>(in.From(kLayoutDTypeTable)));
  v1::Policy* p = req.mutable_policy();
  ReadTensorPolicy(in, layers, p->mutable_k());
  ReadTensorPolicy(in, layers, p->mutable_v());
  p->set_dense_window(in.From(kDenseWindowTable));
  p->set_chunk_tokens(in.From(kChunkTable));
  p->set_group_tokens(in.From(kGroupTable));
  p->set_decode_compute(static_cast<v1::DecodeCompute>(in.From(kComputeTable)));
  req.set_ttl_seconds(in.From(kTtlTable));
  switch (in.Pick(4)) {
    case 1:
      req.set_tenant("a");
      break;
    case 2:
      req.set_tenant("b");
      break;
    case 3:
      req.set_tenant(std::string(200, 't'));
      break;
    default:
      break;
  }
  switch (in.Pick(5)) {
    case 1:
      (*req.mutable_labels())["k"] = "v";
      break;
    case 2:
      for (int i = 0; i < 32; ++i)
        (*req.mutable_labels())["k" + std::to_string(i)] = std::string(256, 'v');
      break;
    case 3:
      for (int i = 0; i < 33; ++i) (*req.mutable_labels())["k" + std::to_string(i)] = "v";
      break;
    case 4:
      (*req.mutable_labels())[std::string(65, 'k')] = "v";
      break;
    default:
      break;
  }
  CallResult r = CallOne(kCreateSession, req);
  SessionModel m;
  m.id = id;
  if (r.status.ok()) {
    const auto s = MustParse<v1::Session>(r.responses.at(0), "CreateSession");
    FUZZ_CHECK(id.empty() || s.id() == id, "CreateSession(%s) returned id %s", id.c_str(),
               s.id().c_str());
    FUZZ_CHECK(!FindLive(w, s.id()), "CreateSession reused live id %s", s.id().c_str());
    m.id = s.id();
    m.live = true;
    m.layers = static_cast<int>(s.layout().num_layers());
    m.kv = static_cast<int>(s.layout().num_kv_heads());
    m.q = static_cast<int>(s.layout().num_q_heads());
    m.dim = static_cast<int>(s.layout().head_dim());
    m.dtype = s.layout().dtype();
    FUZZ_CHECK(m.layers == layers && m.kv == kv && m.q == static_cast<int>(l->num_q_heads()) &&
                   m.dim == static_cast<int>(l->head_dim()),
               "CreateSession returned a different layout");
    FUZZ_CHECK(m.layers >= 1 && m.layers <= kMaxLayers && m.kv >= 1 && m.kv <= kMaxHeads &&
                   m.q >= 1 && m.q <= kMaxHeads && m.q % m.kv == 0 && m.dim >= 1 &&
                   m.dim <= kMaxHeadDim,
               "CreateSession accepted layout %d/%d/%d/%d beyond the server's limits", m.layers,
               m.kv, m.q, m.dim);
    FUZZ_CHECK(m.dtype == v1::DTYPE_FLOAT16 || m.dtype == v1::DTYPE_FLOAT32 ||
                   m.dtype == v1::DTYPE_BFLOAT16,
               "CreateSession returned dtype %d", m.dtype);
    m.tokens.assign(static_cast<size_t>(m.layers), 0);
    CheckStats(m, s.stats(), "CreateSession");
  }
  w.sessions.push_back(m);
}

// ---------------------------------------------------------------------------------------------
// Structured mode: AppendKV.

constexpr uint32_t kLayerBeginTable[] = {0, 1, 2, 3, 4, 0x80000000u};
constexpr int kTokensTable[] = {4, 1, 2, 17, 32, 33, 64, 100, 300, 1000};
constexpr int kObsTokensTable[] = {1, 4, 16, 17};

// The dtype a tensor is sent in: 0 = fp32, 1 = the session's storage dtype, then fixed ones.
int PickDType(Reader& in, int storage) {
  switch (in.Pick(6)) {
    case 1:
      return storage;
    case 2:
      return v1::DTYPE_FLOAT16;
    case 3:
      return v1::DTYPE_BFLOAT16;
    case 4:
      return v1::DTYPE_UNSPECIFIED;
    case 5:
      return 9;
    default:
      return v1::DTYPE_FLOAT32;
  }
}

struct AppendMsg {
  std::string session_id;
  SessionModel* target = nullptr;  // null: unknown session
  int layer_begin = 0, layers = 0, tokens = 0;
  bool expect_invalid = false;  // shape, dtype, length or range wrong
  bool must_reject = false;     // non-finite values (or fp16 overflow into an fp16 cache)
  bool extreme = false;         // some value is not small
};

void RunAppend(World& w, Reader in) {
  std::string sid;
  const SessionModel* picked = PickSession(w, in, &sid);
  const int nmsgs = 1 + in.Pick(3);
  const bool cancel = in.Pick(16) == 15;
  std::vector<std::string> msgs;
  std::vector<AppendMsg> facts;
  for (int i = 0; i < nmsgs; ++i) {
    AppendMsg a;
    a.session_id = sid;
    if (in.Pick(8) == 7 && !w.sessions.empty()) a.session_id = w.sessions[0].id;  // mixed ids
    a.target = FindLive(w, a.session_id);
    const int L = a.target ? a.target->layers : (picked ? picked->layers : 2);
    const int kv = a.target ? a.target->kv : 2;
    const int q = a.target ? a.target->q : 4;
    const int dim = a.target ? a.target->dim : 32;
    const int storage = a.target ? a.target->dtype : v1::DTYPE_FLOAT16;
    a.layer_begin = static_cast<int>(std::min<uint32_t>(in.From(kLayerBeginTable), 0x7fffffff));
    switch (in.Pick(4)) {
      case 1:
        a.layers = 1;
        break;
      case 2:
        a.layers = 2;
        break;
      case 3:
        a.layers = L + 1;
        break;
      default:
        a.layers = L - a.layer_begin;
        break;
    }
    if (a.layers < 1) a.layers = 1;
    a.tokens = in.From(kTokensTable);
    const int64_t per_token = static_cast<int64_t>(a.layers) * kv * dim;
    if (a.tokens * per_token > kMaxElements) {
      a.tokens = static_cast<int>(std::max<int64_t>(1, kMaxElements / per_token));
    }
    const int kd = PickDType(in, storage);
    int vd = kd;
    switch (in.Pick(5)) {
      case 1:
        vd = v1::DTYPE_FLOAT32;
        break;
      case 2:
        vd = v1::DTYPE_FLOAT16;
        break;
      case 3:
        vd = v1::DTYPE_BFLOAT16;
        break;
      case 4:
        vd = v1::DTYPE_UNSPECIFIED;
        break;
      default:
        break;
    }
    const int shape_mut = in.Pick(kNumShapeMuts);
    const int byte_mut = in.Pick(kNumByteMuts);
    const int kcls = in.Pick(kNumValueClasses);
    const int vcls = in.Pick(kNumValueClasses);
    const int obs_mode = in.Pick(4);
    const int obs_tokens = in.From(kObsTokensTable);
    const int obs_cls = in.Pick(kNumValueClasses);
    w.rng.s ^= in.Byte();
    v1::AppendKVRequest req;
    req.set_session_id(a.session_id);
    req.set_layer_begin(static_cast<uint32_t>(a.layer_begin));
    const std::vector<int64_t> shape = {a.layers, a.tokens, kv, dim};
    const TensorFacts kf =
        BuildTensor(req.mutable_k(), kd, shape, 2, shape_mut, byte_mut, kcls, w.rng);
    TensorFacts vf = BuildTensor(req.mutable_v(), vd, shape, 2, kShapeOk, kBytesOk, vcls, w.rng);
    if (kd != vd) vf.valid = false;
    TensorFacts of;
    if (obs_mode != 0) {
      const std::vector<int64_t> oshape = {a.layers, obs_tokens, q, dim};
      of = BuildTensor(req.mutable_obs_q(), obs_mode == 3 ? v1::DTYPE_UNSPECIFIED : kd, oshape, 2,
                       obs_mode == 2 ? kShapeHeads : kShapeOk, kBytesOk, obs_cls, w.rng);
      if (obs_tokens > kMaxObsTokens) of.valid = false;
    }
    a.expect_invalid = !kf.valid || !vf.valid || !of.valid || !a.target ||
                       int64_t{a.layer_begin} + a.layers > L ||
                       (!msgs.empty() && a.session_id != facts[0].session_id);
    a.must_reject = kf.nonfinite || vf.nonfinite || of.nonfinite ||
                    (storage == v1::DTYPE_FLOAT16 && (kf.overflows_f16 || vf.overflows_f16));
    a.extreme = !kf.small || !vf.small;
    msgs.push_back(req.SerializeAsString());
    facts.push_back(a);
  }
  const CallResult r = Call(kAppendKV, msgs, cancel);
  const grpc::StatusCode code = r.status.error_code();
  if (cancel) {
    SettleAfterCancel(w);
    return;
  }
  // Which sessions the stream may have touched.
  std::vector<SessionModel*> touched;
  for (const AppendMsg& a : facts) {
    if (a.target && std::find(touched.begin(), touched.end(), a.target) == touched.end()) {
      touched.push_back(a.target);
    }
  }
  auto apply = [&](size_t count, std::map<SessionModel*, std::vector<int64_t>>* out) {
    for (SessionModel* s : touched) (*out)[s] = s->tokens;
    for (size_t i = 0; i < count; ++i) {
      const AppendMsg& a = facts[i];
      if (!a.target) continue;
      for (int64_t l = a.layer_begin; l < int64_t{a.layer_begin} + a.layers && l < a.target->layers;
           ++l) {
        (*out)[a.target][l] += a.tokens;
      }
    }
  };
  if (code == grpc::StatusCode::OK) {
    for (size_t i = 0; i < facts.size(); ++i) {
      FUZZ_CHECK(!facts[i].must_reject,
                 "AppendKV accepted message %zu with non-finite values (or fp16 overflow)", i);
      FUZZ_CHECK(!facts[i].expect_invalid || cancel,
                 "AppendKV accepted message %zu with a bad shape, dtype, length or range", i);
    }
    std::map<SessionModel*, std::vector<int64_t>> after;
    apply(facts.size(), &after);
    for (auto& [s, t] : after) s->tokens = t;
    const auto resp = MustParse<v1::AppendKVResponse>(r.responses.at(0), "AppendKV");
    FUZZ_CHECK(resp.messages() == facts.size(), "AppendKV applied %llu of %zu messages",
               static_cast<unsigned long long>(resp.messages()), facts.size());
    if (!touched.empty()) {
      // The response lists the tokens of the stream's session (every message names it).
      const std::vector<int64_t> got(resp.tokens_per_layer().begin(),
                                     resp.tokens_per_layer().end());
      FUZZ_CHECK(got == facts[0].target->tokens, "AppendKV tokens_per_layer %s, model %s",
                 TokensString(got).c_str(), TokensString(facts[0].target->tokens).c_str());
    }
  } else {
    // A prefix of the messages stays applied, each whole: find which.
    std::map<std::string, std::vector<int64_t>> now;
    for (SessionModel* s : touched) {
      v1::Session got;
      FUZZ_CHECK(FetchSession(s->id, &got), "session %s vanished after AppendKV", s->id.c_str());
      now[s->id] = StatsTokens(got.stats());
    }
    bool matched = false;
    for (size_t p = 0; p < facts.size() && !matched; ++p) {
      std::map<SessionModel*, std::vector<int64_t>> after;
      apply(p, &after);
      bool all = true;
      for (auto& [s, t] : after) all &= now[s->id] == t;
      if (!all) continue;
      matched = true;
      for (size_t i = 0; i < p; ++i) {
        FUZZ_CHECK(!facts[i].must_reject, "AppendKV applied message %zu with non-finite values", i);
      }
      for (auto& [s, t] : after) s->tokens = t;
      for (size_t i = 0; i < p; ++i) {
        if (facts[i].extreme && facts[i].target) facts[i].target->extreme = true;
      }
    }
    FUZZ_CHECK(matched || cancel,
               "failed AppendKV (%s: %s) left its session(s) in a state no prefix of its %zu "
               "messages explains",
               CodeName(code), r.status.error_message().c_str(), facts.size());
    if (!matched) {  // cancelled: adopt what the server has
      for (SessionModel* s : touched) {
        s->tokens = now[s->id];
        s->extreme = true;
      }
    }
    return;
  }
  for (const AppendMsg& a : facts) {
    if (a.extreme && a.target) a.target->extreme = true;
  }
}

// ---------------------------------------------------------------------------------------------
// Structured mode: Decode and DecodeStream.

constexpr uint32_t kDecodeLayerTable[] = {0, 1, 2, 3, 4, 1000};
constexpr int kQDTypeTable[] = {v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT16, v1::DTYPE_BFLOAT16,
                                v1::DTYPE_UNSPECIFIED, 7};
constexpr float kScaleTable[] = {0.0f, 1.0f, 0.125f, -1.0f, NAN, INFINITY, 1e30f, 1e-30f, -0.0f};
constexpr int kOutDTypeTable[] = {v1::DTYPE_UNSPECIFIED, v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT16,
                                  v1::DTYPE_BFLOAT16, 9};

struct ItemFacts {
  SessionModel* target = nullptr;
  int layer = 0;
  bool new_token = false;
  bool expect_invalid = false;
  bool must_reject = false;
  bool small = true;  // q, new K/V small and scale ordinary
  bool want_lse = false;
};

struct DecodeBuild {
  v1::DecodeRequest req;
  std::vector<ItemFacts> items;
  int out_dtype = v1::DTYPE_FLOAT32;
  bool expect_invalid = false;
};

DecodeBuild BuildDecode(World& w, Reader& in) {
  DecodeBuild b;
  const int nitems = 1 + in.Pick(3);
  const int out = in.From(kOutDTypeTable);
  b.req.set_out_dtype(static_cast<v1::DType>(out));
  b.out_dtype = out == v1::DTYPE_UNSPECIFIED ? v1::DTYPE_FLOAT32 : out;
  if (out == 9) b.expect_invalid = true;
  b.req.set_request_id(in.Byte() * 7919ull + 1);
  for (int i = 0; i < nitems; ++i) {
    ItemFacts f;
    std::string sid;
    PickSession(w, in, &sid);
    f.target = FindLive(w, sid);
    const int kv = f.target ? f.target->kv : 2;
    const int q = f.target ? f.target->q : 4;
    const int dim = f.target ? f.target->dim : 32;
    const int storage = f.target ? f.target->dtype : v1::DTYPE_FLOAT16;
    f.layer = static_cast<int>(in.From(kDecodeLayerTable));
    const int qd = in.From(kQDTypeTable);
    const int shape_mut = in.Pick(kNumShapeMuts);
    const int byte_mut = in.Pick(kNumByteMuts);
    const int qcls = in.Pick(kNumValueClasses);
    const int new_mode = in.Pick(6);
    const int new_cls = in.Pick(kNumValueClasses);
    f.want_lse = in.Pick(2) == 1;
    const float scale = in.From(kScaleTable);
    const int nd = PickDType(in, storage);
    w.rng.s ^= in.Byte();
    v1::DecodeItem* item = b.req.add_items();
    item->set_session_id(sid);
    item->set_layer(static_cast<uint32_t>(f.layer));
    item->set_want_lse(f.want_lse);
    item->set_scale(scale);
    TensorFacts qf =
        BuildTensor(item->mutable_q(), qd, {q, dim}, 0, shape_mut, byte_mut, qcls, w.rng);
    bool new_valid = true;
    TensorFacts kf, vf;
    switch (new_mode) {
      case 1:  // both, valid
        kf = BuildTensor(item->mutable_new_k(), nd, {kv, dim}, 0, kShapeOk, kBytesOk, new_cls,
                         w.rng);
        vf = BuildTensor(item->mutable_new_v(), nd, {kv, dim}, 0, kShapeOk, kBytesOk, new_cls,
                         w.rng);
        f.new_token = true;
        break;
      case 2:  // K only
        kf = BuildTensor(item->mutable_new_k(), nd, {kv, dim}, 0, kShapeOk, kBytesOk, new_cls,
                         w.rng);
        new_valid = false;
        break;
      case 3:  // K float32, V float16 of the same shape (issue #11's over-read)
        kf = BuildTensor(item->mutable_new_k(), v1::DTYPE_FLOAT32, {kv, dim}, 0, kShapeOk, kBytesOk,
                         new_cls, w.rng);
        vf = BuildTensor(item->mutable_new_v(), v1::DTYPE_FLOAT16, {kv, dim}, 0, kShapeOk, kBytesOk,
                         new_cls, w.rng);
        new_valid = false;
        break;
      case 4:  // bad shape
        kf = BuildTensor(item->mutable_new_k(), nd, {kv, dim}, 0, kShapeHeads, kBytesOk, new_cls,
                         w.rng);
        vf = BuildTensor(item->mutable_new_v(), nd, {kv, dim}, 0, kShapeHeads, kBytesOk, new_cls,
                         w.rng);
        new_valid = false;
        break;
      case 5:  // bad byte length
        kf = BuildTensor(item->mutable_new_k(), nd, {kv, dim}, 0, kShapeOk, kBytesShort, new_cls,
                         w.rng);
        vf = BuildTensor(item->mutable_new_v(), nd, {kv, dim}, 0, kShapeOk, kBytesShort, new_cls,
                         w.rng);
        new_valid = false;
        break;
      default:
        break;
    }
    if (f.new_token && (!kf.valid || !vf.valid)) new_valid = false;
    f.expect_invalid = !qf.valid || !new_valid || !f.target ||
                       (f.target && f.layer >= f.target->layers) || std::isnan(scale) ||
                       std::isinf(scale);
    f.must_reject =
        qf.nonfinite || kf.nonfinite || vf.nonfinite ||
        (storage == v1::DTYPE_FLOAT16 && f.new_token && (kf.overflows_f16 || vf.overflows_f16));
    f.small = qf.small && (!f.new_token || (kf.small && vf.small)) && std::isfinite(scale) &&
              std::fabs(scale) <= 1.0f;
    if (f.expect_invalid) b.expect_invalid = true;
    b.items.push_back(f);
  }
  return b;
}

// Checks one decode's outcome (`error_code` 0 = OK) against the model and updates it.
void CheckDecode(World& w, DecodeBuild& b, int error_code, const std::string& error_message,
                 const v1::DecodeResponse* resp, const char* where) {
  if (error_code != 0) return;  // a failed request changes nothing: SyncModel checks it later
  FUZZ_CHECK(!b.expect_invalid, "%s accepted a request with a bad item or out_dtype", where);
  FUZZ_CHECK(resp->results_size() == static_cast<int>(b.items.size()),
             "%s: %d results for %zu items", where, resp->results_size(), b.items.size());
  for (size_t i = 0; i < b.items.size(); ++i) {
    ItemFacts& f = b.items[i];
    FUZZ_CHECK(!f.must_reject, "%s accepted item %zu with non-finite values", where, i);
    SessionModel& s = *f.target;
    if (f.new_token) s.tokens[f.layer] += 1;
    const v1::DecodeResult& res = resp->results(static_cast<int>(i));
    FUZZ_CHECK(res.tokens_attended() == static_cast<uint64_t>(s.tokens[f.layer]),
               "%s item %zu: tokens_attended %llu, model has %lld tokens in layer %d", where, i,
               static_cast<unsigned long long>(res.tokens_attended()),
               static_cast<long long>(s.tokens[f.layer]), f.layer);
    FUZZ_CHECK(res.out().dtype() == b.out_dtype && res.out().shape_size() == 2 &&
                   res.out().shape(0) == s.q && res.out().shape(1) == s.dim,
               "%s item %zu: out has dtype %d and %d dims, expected [%d, %d] of dtype %d", where, i,
               res.out().dtype(), res.out().shape_size(), s.q, s.dim, b.out_dtype);
    std::vector<float> out, lse;
    FUZZ_CHECK(TensorValues(res.out(), &out), "%s item %zu: out tensor is inconsistent", where, i);
    if (f.want_lse) {
      FUZZ_CHECK(res.lse().dtype() == v1::DTYPE_FLOAT32 && res.lse().shape_size() == 1 &&
                     res.lse().shape(0) == s.q && TensorValues(res.lse(), &lse),
                 "%s item %zu: lse is not [%d] float32", where, i, s.q);
    } else {
      FUZZ_CHECK(res.lse().data().empty(), "%s item %zu: lse sent without want_lse", where, i);
    }
    if (f.small && !s.extreme) {
      FUZZ_CHECK(AllFinite(out),
                 "%s item %zu: non-finite output from small finite inputs "
                 "(session %s layer %d, %lld tokens)",
                 where, i, s.id.c_str(), f.layer, static_cast<long long>(s.tokens[f.layer]));
      for (float x : lse) {
        FUZZ_CHECK(std::isfinite(x) || (s.tokens[f.layer] == 0 && x == -INFINITY),
                   "%s item %zu: lse %g from small finite inputs over %lld tokens", where, i, x,
                   static_cast<long long>(s.tokens[f.layer]));
      }
    }
    if (!f.small && f.new_token) s.extreme = true;
  }
  (void)w;
  (void)error_message;
}

void RunDecode(World& w, Reader in) {
  DecodeBuild b = BuildDecode(w, in);
  const CallResult r = CallOne(kDecode, b.req);
  v1::DecodeResponse resp;
  if (r.status.ok()) resp = MustParse<v1::DecodeResponse>(r.responses.at(0), "Decode");
  if (r.status.ok()) {
    FUZZ_CHECK(resp.request_id() == b.req.request_id(), "Decode did not echo request_id");
  }
  CheckDecode(w, b, r.status.error_code(), r.status.error_message(), &resp, "Decode");
}

void RunDecodeStream(World& w, Reader in) {
  const int nreq = 1 + in.Pick(4);
  const bool cancel = in.Pick(16) == 15;
  std::vector<std::string> msgs;
  std::vector<DecodeBuild> builds;
  size_t garbage_at = SIZE_MAX;
  for (int i = 0; i < nreq; ++i) {
    Reader sub = in.Slice();
    if (sub.Pick(16) == 15 && garbage_at == SIZE_MAX) {
      garbage_at = msgs.size();
      msgs.push_back(std::string("\xff\xff\xff\xff", 4));
      builds.emplace_back();
      continue;
    }
    builds.push_back(BuildDecode(w, sub));
    msgs.push_back(builds.back().req.SerializeAsString());
  }
  const CallResult r = Call(kDecodeStream, msgs, cancel);
  const size_t want = garbage_at == SIZE_MAX ? msgs.size() : garbage_at;
  if (!cancel) {
    FUZZ_CHECK(r.responses.size() == want, "DecodeStream: %zu replies to %zu requests (%s)",
               r.responses.size(), want, r.status.error_message().c_str());
    FUZZ_CHECK(
        r.status.error_code() ==
            (garbage_at == SIZE_MAX ? grpc::StatusCode::OK : grpc::StatusCode::INVALID_ARGUMENT),
        "DecodeStream ended with %s: %s", CodeName(r.status.error_code()),
        r.status.error_message().c_str());
  }
  for (size_t i = 0; i < r.responses.size(); ++i) {
    const auto resp = MustParse<v1::DecodeResponse>(r.responses[i], "DecodeStream");
    FUZZ_CHECK(resp.request_id() == builds[i].req.request_id(),
               "DecodeStream reply %zu has the wrong request_id", i);
    CheckCode(kDecodeStream, resp.error_code(), resp.error_message(), false);
    CheckDecode(w, builds[i], resp.error_code(), resp.error_message(), &resp, "DecodeStream");
  }
  if (cancel) SettleAfterCancel(w);  // requests the cancel cut off may still be applied
}

// ---------------------------------------------------------------------------------------------
// Structured mode: the other RPCs.

void RunFlush(World& w, Reader in) {
  std::string sid;
  const SessionModel* s = PickSession(w, in, &sid);
  v1::FlushRequest req;
  req.set_session_id(sid);
  const CallResult r = CallOne(kFlush, req);
  if (!s) {
    FUZZ_CHECK(!r.status.ok(), "Flush of unknown session %s returned OK", sid.c_str());
    return;
  }
  FUZZ_CHECK(r.status.ok() || r.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED,
             "Flush of live session failed: %s", r.status.error_message().c_str());
  if (r.status.ok()) {
    const auto resp = MustParse<v1::FlushResponse>(r.responses.at(0), "Flush");
    CheckStats(*s, resp.stats(), "Flush");
  }
}

constexpr uint32_t kReadLayerBeginTable[] = {0, 1, 2, 3, 5, 0x80000000u};
constexpr uint32_t kReadLayerCountTable[] = {0, 1, 2, 5, 0x80000000u};
constexpr uint64_t kReadTokenBeginTable[] = {0, 1, 5, 33, 1000, 1ull << 41};
constexpr uint64_t kReadTokenCountTable[] = {0, 1, 3, 40, 1ull << 41};

void RunReadKV(World& w, Reader in) {
  std::string sid;
  const SessionModel* s = PickSession(w, in, &sid);
  v1::ReadKVRequest req;
  req.set_session_id(sid);
  req.set_layer_begin(in.From(kReadLayerBeginTable));
  req.set_layer_count(in.From(kReadLayerCountTable));
  req.set_token_begin(in.From(kReadTokenBeginTable));
  req.set_token_count(in.From(kReadTokenCountTable));
  const bool cancel = in.Pick(16) == 15;
  const CallResult r = CallOne(kReadKV, req, cancel);
  if (cancel) return;
  if (!s) {
    FUZZ_CHECK(!r.status.ok(), "ReadKV of unknown session returned OK");
    return;
  }
  // What the model says: layers [lb, le), tokens [tb, tb + count) of each.
  const uint64_t lb = req.layer_begin();
  const uint64_t le = req.layer_count() == 0 ? s->layers : lb + req.layer_count();
  bool valid = lb < static_cast<uint64_t>(s->layers) && le <= static_cast<uint64_t>(s->layers);
  if (valid) {
    for (uint64_t l = lb; l < le; ++l) {
      const uint64_t have = static_cast<uint64_t>(s->tokens[l]);
      if (req.token_begin() > have || req.token_begin() + req.token_count() > have) valid = false;
    }
  }
  FUZZ_CHECK(valid == r.status.ok(), "ReadKV layers [%llu, %llu) tokens %llu+%llu of %s %s: %s",
             static_cast<unsigned long long>(lb), static_cast<unsigned long long>(le),
             static_cast<unsigned long long>(req.token_begin()),
             static_cast<unsigned long long>(req.token_count()), TokensString(s->tokens).c_str(),
             valid ? "failed" : "succeeded", r.status.error_message().c_str());
  if (!r.status.ok()) return;
  std::vector<int64_t> rows(static_cast<size_t>(s->layers), 0);
  std::vector<int64_t> next(static_cast<size_t>(s->layers),
                            static_cast<int64_t>(req.token_begin()));
  std::vector<float> vals;
  for (const std::string& bytes : r.responses) {
    FUZZ_CHECK(static_cast<int64_t>(bytes.size()) <= kMaxMessageBytes,
               "ReadKV message of %zu bytes", bytes.size());
    const auto m = MustParse<v1::ReadKVResponse>(bytes, "ReadKV");
    FUZZ_CHECK(m.layer() >= lb && m.layer() < le, "ReadKV sent layer %u", m.layer());
    FUZZ_CHECK(static_cast<int64_t>(m.token_begin()) == next[m.layer()],
               "ReadKV layer %u: token_begin %llu, expected %lld", m.layer(),
               static_cast<unsigned long long>(m.token_begin()),
               static_cast<long long>(next[m.layer()]));
    for (const v1::Tensor* t : {&m.k(), &m.v()}) {
      FUZZ_CHECK(t->dtype() == s->dtype && t->shape_size() == 3 && t->shape(1) == s->kv &&
                     t->shape(2) == s->dim && t->shape(0) >= 1 && t->shape(0) == m.k().shape(0),
                 "ReadKV layer %u: tensor of dtype %d with %d dims", m.layer(), t->dtype(),
                 t->shape_size());
      FUZZ_CHECK(TensorValues(*t, &vals), "ReadKV layer %u: inconsistent tensor", m.layer());
      FUZZ_CHECK(AllFinite(vals), "ReadKV layer %u: non-finite value stored", m.layer());
    }
    rows[m.layer()] += m.k().shape(0);
    next[m.layer()] += m.k().shape(0);
  }
  for (uint64_t l = lb; l < le; ++l) {
    const int64_t want = req.token_count() == 0
                             ? s->tokens[l] - static_cast<int64_t>(req.token_begin())
                             : static_cast<int64_t>(req.token_count());
    FUZZ_CHECK(rows[l] == want, "ReadKV layer %llu: %lld rows, expected %lld",
               static_cast<unsigned long long>(l), static_cast<long long>(rows[l]),
               static_cast<long long>(want));
  }
}

void RunGetSession(World& w, Reader in) {
  std::string sid;
  const SessionModel* s = PickSession(w, in, &sid);
  v1::Session got;
  const bool found = FetchSession(sid, &got);
  FUZZ_CHECK(found == (s != nullptr), "GetSession(%s): found %d, model %d", sid.c_str(), found,
             s != nullptr);
  if (s) CheckStats(*s, got.stats(), "GetSession");
}

void RunListSessions(World& w, Reader in) {
  static const char* const kTenants[] = {"", "a", "b", "zzz"};
  static const uint32_t kPageSizes[] = {0, 1, 2, 1000, 5000};
  v1::ListSessionsRequest req;
  req.set_tenant(in.From(kTenants));
  req.set_page_size(in.From(kPageSizes));
  switch (in.Pick(5)) {
    case 1:
      req.set_page_token("s0");
      break;
    case 2:
      req.set_page_token("s1");
      break;
    case 3:
      req.set_page_token("zzz");
      break;
    case 4:
      req.set_page_token(std::string(200, 'p'));
      break;
    default:
      break;
  }
  const CallResult r = CallOne(kListSessions, req);
  FUZZ_CHECK(r.status.ok(), "ListSessions failed: %s", r.status.error_message().c_str());
  const auto resp = MustParse<v1::ListSessionsResponse>(r.responses.at(0), "ListSessions");
  const uint32_t limit = req.page_size() == 0 ? 100 : std::min<uint32_t>(req.page_size(), 1000);
  FUZZ_CHECK(static_cast<uint32_t>(resp.sessions_size()) <= limit,
             "ListSessions returned %d sessions for page_size %u", resp.sessions_size(),
             req.page_size());
  std::string prev = req.page_token();
  for (const v1::Session& s : resp.sessions()) {
    FUZZ_CHECK(s.id() > prev, "ListSessions out of order or before the page token");
    FUZZ_CHECK(req.tenant().empty() || s.tenant() == req.tenant(),
               "ListSessions returned a session of another tenant");
    prev = s.id();
    if (const SessionModel* m = FindLive(w, s.id())) CheckStats(*m, s.stats(), "ListSessions");
  }
}

void RunDelete(World& w, Reader in) {
  std::string sid;
  const SessionModel* s = PickSession(w, in, &sid);
  v1::DeleteSessionRequest req;
  req.set_session_id(sid);
  const CallResult r = CallOne(kDeleteSession, req);
  FUZZ_CHECK(r.status.ok() == (s != nullptr), "DeleteSession(%s) returned %s, model live %d",
             sid.c_str(), CodeName(r.status.error_code()), s != nullptr);
  if (s) FindLive(w, sid)->live = false;
}

// Snapshot records (core/snapshot.h): "SKVSNAP\0" u32 version, then u32 type, u64 size,
// payload, u32 crc32c(payload); the end record (type 3) holds u32 layers and the crc32c of
// every byte before it.
struct SnapRecord {
  uint32_t type;
  size_t at;       // first byte of the record
  size_t payload;  // first byte of the payload
  uint64_t size;
};

uint32_t LoadU32(const std::string& s, size_t at) {
  uint32_t v;
  std::memcpy(&v, s.data() + at, 4);
  return v;
}

void StoreU32(std::string* s, size_t at, uint32_t v) { std::memcpy(s->data() + at, &v, 4); }

bool SplitSnapshot(const std::string& snap, std::vector<SnapRecord>* out) {
  size_t p = 12;
  while (p + 12 <= snap.size()) {
    SnapRecord r;
    r.type = LoadU32(snap, p);
    std::memcpy(&r.size, snap.data() + p + 4, 8);
    r.at = p;
    r.payload = p + 12;
    if (r.size > snap.size() - r.payload || snap.size() - r.payload - r.size < 4) return false;
    out->push_back(r);
    p = r.payload + r.size + 4;
  }
  return p == snap.size() && !out->empty();
}

// Recomputes every record's checksum and the end record's whole-file checksum, so that a
// mutated payload reaches the snapshot parser's content checks.
void FixSnapshotChecksums(std::string* snap, const std::vector<SnapRecord>& recs) {
  for (const SnapRecord& r : recs) {
    if (r.type == 3 && r.size == 8)
      StoreU32(snap, r.payload + 4, Crc32c(std::string_view(*snap).substr(0, r.at)));
    StoreU32(snap, r.payload + r.size, Crc32c(std::string_view(*snap).substr(r.payload, r.size)));
  }
}

v1::SessionChunk Piece(const std::string& snap, size_t at, size_t n, bool last) {
  v1::SessionChunk c;
  c.set_format_version(kSnapshotVersion);
  c.set_offset(at);
  c.set_data(snap.substr(at, n));
  c.set_crc32c(Crc32c(c.data()));
  c.set_last(last);
  return c;
}

// Export a session, then import it back: intact (after deleting the original, or while it
// still exists), with its content mutated and every checksum fixed up (reaches the parser's
// layout, policy and layer checks), or damaged in transport (piece checksum, offset, version,
// missing last piece, a changed byte without fixing checksums).
void RunSnapshot(World& w, Reader in) {
  std::string sid;
  SessionModel* s = const_cast<SessionModel*>(PickSession(w, in, &sid));
  const int mode = in.Pick(4);
  const int split = in.Pick(3);
  const bool cancel = in.Pick(16) == 15;
  v1::ExportSessionRequest req;
  req.set_session_id(sid);
  const CallResult ex = CallOne(kExportSession, req, cancel && mode == 0);
  if (ex.cancelled) return;
  FUZZ_CHECK(ex.status.ok() == (s != nullptr), "ExportSession(%s) returned %s: %s", sid.c_str(),
             CodeName(ex.status.error_code()), ex.status.error_message().c_str());
  if (!ex.status.ok()) return;
  // The pieces must tile the snapshot, each with its checksum, the last one marked.
  std::string snap;
  for (size_t i = 0; i < ex.responses.size(); ++i) {
    const auto c = MustParse<v1::SessionChunk>(ex.responses[i], "ExportSession");
    FUZZ_CHECK(c.format_version() == kSnapshotVersion && c.offset() == snap.size() &&
                   c.crc32c() == Crc32c(c.data()) && c.last() == (i + 1 == ex.responses.size()),
               "ExportSession piece %zu is malformed", i);
    snap += c.data();
  }
  std::vector<SnapRecord> recs;
  FUZZ_CHECK(SplitSnapshot(snap, &recs) && recs.front().type == 1 && recs.back().type == 3 &&
                 recs.size() == static_cast<size_t>(s->layers) + 2,
             "ExportSession: %zu bytes are not header + %d layers + end records", snap.size(),
             s->layers);
  // SPARSEKV_FUZZ_SKIP_IMPORT=1 stops here (export only): for a long run while a bug in the
  // import path (see regressions/) would end every run at once.
  static const bool skip_import = std::getenv("SPARSEKV_FUZZ_SKIP_IMPORT") != nullptr;
  if (skip_import) return;
  bool intact = true;
  int damage = -1;
  if (mode == 2) {  // content mutations, checksums fixed
    const int n = 1 + in.Pick(4);
    for (int i = 0; i < n; ++i) {
      const SnapRecord& r = recs[static_cast<size_t>(in.Pick(static_cast<int>(recs.size())))];
      if (r.size == 0) continue;
      const size_t at = r.payload + in.U16() % r.size;
      const uint8_t op = in.Byte();
      const uint8_t v = in.Byte();
      if (op % 3 == 0) {
        snap[at] = static_cast<char>(v);
      } else if (op % 3 == 1) {
        snap[at] = static_cast<char>(snap[at] ^ (1 << (v % 8)));
      } else if (at + 4 <= r.payload + r.size) {  // a 32-bit field: 0, -1 or huge
        const uint32_t vals[] = {0, 0xffffffffu, 0x7fffffffu, 0x80000000u, v};
        StoreU32(&snap, at, vals[v % 5]);
      }
    }
    FixSnapshotChecksums(&snap, recs);
    intact = false;
  } else if (mode == 3) {
    damage = in.Pick(5);
    intact = false;
  }
  const bool delete_first = mode != 1 && (mode == 0 || in.Pick(2) == 0);
  if (delete_first) {
    v1::DeleteSessionRequest d;
    d.set_session_id(sid);
    const CallResult r = CallOne(kDeleteSession, d);
    FUZZ_CHECK(r.status.ok(), "DeleteSession(%s) before import failed: %s", sid.c_str(),
               r.status.error_message().c_str());
    s->live = false;
  }
  const size_t piece = split == 0 ? 65536 : split == 1 ? 7 : snap.size();
  std::vector<std::string> msgs;
  for (size_t at = 0; at < snap.size(); at += piece) {
    const size_t n = std::min(piece, snap.size() - at);
    v1::SessionChunk c = Piece(snap, at, n, at + n == snap.size());
    if (damage >= 0 && at + n == snap.size()) {  // damage the last piece
      switch (damage) {
        case 0:
          c.set_crc32c(c.crc32c() ^ 1);
          break;
        case 1:
          c.set_offset(c.offset() + 1);
          break;
        case 2:
          c.set_format_version(kSnapshotVersion + 1);
          break;
        case 3:
          c.set_last(false);
          break;
        default:  // a payload byte changed, checksums of the whole left as they were
          if (!c.data().empty()) {
            std::string d = c.data();
            d[d.size() / 2] = static_cast<char>(d[d.size() / 2] ^ 0x40);
            c.set_data(d);
            c.set_crc32c(Crc32c(c.data()));
          }
          break;
      }
    }
    msgs.push_back(c.SerializeAsString());
  }
  const CallResult im = Call(kImportSession, msgs, cancel && mode != 0);
  if (im.cancelled) {
    SettleAfterCancel(w);
    return;
  }
  const grpc::StatusCode code = im.status.error_code();
  if (intact) {
    FUZZ_CHECK(code == (delete_first ? grpc::StatusCode::OK : grpc::StatusCode::ALREADY_EXISTS) ||
                   code == grpc::StatusCode::RESOURCE_EXHAUSTED,
               "ImportSession of an intact snapshot of %s (original %s) returned %s: %s",
               sid.c_str(), delete_first ? "deleted" : "live", CodeName(code),
               im.status.error_message().c_str());
    if (code == grpc::StatusCode::OK) {
      const auto got = MustParse<v1::Session>(im.responses.at(0), "ImportSession");
      FUZZ_CHECK(got.id() == sid, "ImportSession restored %s as %s", sid.c_str(), got.id().c_str());
      s->live = true;
      CheckStats(*s, got.stats(), "ImportSession");
    }
    return;
  }
  if (damage >= 0) {
    FUZZ_CHECK(code != grpc::StatusCode::OK,
               "ImportSession accepted a snapshot damaged in "
               "transport (kind %d)",
               damage);
    return;
  }
  // Mutated content with valid checksums: anything but a crash or a broken invariant.
  if (code == grpc::StatusCode::OK) {
    const auto got = MustParse<v1::Session>(im.responses.at(0), "ImportSession");
    FUZZ_CHECK(got.layout().num_layers() >= 1 &&
                   got.layout().num_layers() <= static_cast<uint32_t>(kMaxLayers) &&
                   got.layout().num_kv_heads() <= static_cast<uint32_t>(kMaxHeads) &&
                   got.layout().num_q_heads() <= static_cast<uint32_t>(kMaxHeads) &&
                   got.layout().head_dim() <= static_cast<uint32_t>(kMaxHeadDim),
               "ImportSession accepted a layout beyond the server's limits");
    SyncModel(w, /*check=*/false);
    CheckAccounting();
    // What was imported must be readable and decodable.
    for (SessionModel& m : w.sessions) {
      if (!m.live || m.id != got.id()) continue;
      v1::ReadKVRequest r;
      r.set_session_id(m.id);
      const CallResult rd = CallOne(kReadKV, r);
      FUZZ_CHECK(rd.status.ok(), "ReadKV of imported session %s failed: %s", m.id.c_str(),
                 rd.status.error_message().c_str());
    }
  }
}

void RunStructured(Reader& in) {
  World w;
  w.rng.s = in.Byte() * 0x100000001b3ull + 1;
  const int nsessions = 1 + in.Pick(2);
  for (int i = 0; i < nsessions; ++i) RunCreate(w, in.Slice());
  for (int ops = 0; ops < 24 && !in.empty(); ++ops) {
    const int op = in.Byte() % kNumOps;
    Reader sub = in.Slice();
    // SPARSEKV_FUZZ_TRACE=1: the operation sequence of an input, to read a crash reproducer.
    static const bool trace = std::getenv("SPARSEKV_FUZZ_TRACE") != nullptr;
    if (trace) std::fprintf(stderr, "op %d: %d\n", ops, op);
    switch (op) {
      case kOpAppend:
        RunAppend(w, sub);
        break;
      case kOpDecode:
        RunDecode(w, sub);
        break;
      case kOpDecodeStream:
        RunDecodeStream(w, sub);
        break;
      case kOpFlush:
        RunFlush(w, sub);
        break;
      case kOpReadKV:
        RunReadKV(w, sub);
        break;
      case kOpGetSession:
        RunGetSession(w, sub);
        break;
      case kOpListSessions:
        RunListSessions(w, sub);
        break;
      case kOpDeleteSession:
        RunDelete(w, sub);
        break;
      case kOpServerInfo:
        CheckAccounting();
        break;
      case kOpSnapshot:
        RunSnapshot(w, sub);
        break;
      case kOpRaw:
        if (!sub.empty()) {
          const bool cancelled = (sub.Peek() & kFlagCancel) != 0;
          RunRawOp(sub);
          if (cancelled) {
            SettleAfterCancel(w);
          } else {
            SyncModel(w, /*check=*/false);
          }
          // A raw CreateSession may have made sessions the model does not know.
        }
        break;
      case kOpCreate:
        RunCreate(w, sub);
        break;
    }
  }
  SyncModel(w, /*check=*/true);
}

}  // namespace
}  // namespace sparsekv::fuzz

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  // Every invalid-UTF-8 string field the fuzzer sends would log a line on both sides.
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  sparsekv::fuzz::harness = new sparsekv::fuzz::Harness();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace sparsekv::fuzz;
  if (size == 0) return 0;
  Reader in(data + 1, size - 1);
  bool sessions = true;
  if (data[0] % 2 == kModeRaw) {
    sessions = RunRaw(in);
  } else {
    RunStructured(in);
  }
  if (sessions) {
    CheckAccounting();
    DeleteAllAndCheckEmpty();
  } else {
    GetInfo();  // the server still answers
  }
  return 0;
}
