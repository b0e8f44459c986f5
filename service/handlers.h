// The KvCacheService's request logic without a transport: every RPC as functions of parsed
// messages that return an absl::Status. KvCacheServiceImpl (service/kv_cache_service.h) wraps
// them in gRPC callback reactors; tests/fuzz's direct driver calls them as they are, so that
// the fuzzer reaches the same validation and core/ calls thousands of times faster than through
// a gRPC channel. Nothing here knows about calls, contexts or threads: the transport parses the
// bytes (service/wire.h), passes a CancelCheck for its deadline and cancellation, serializes
// what comes back and records metrics.
//
// Every method runs as a Caller (service/auth.h) the transport resolved from the call's
// metadata: session lookups go through Find, which confines them to the caller's tenant, so a
// session of another tenant answers exactly as an unknown id; requests that name a tenant are
// checked against it (PERMISSION_DENIED).
//
// Thread-safe: handlers run concurrently; a stream's call object (AppendCall, ReadCall,
// ExportCall, ImportCall) belongs to one stream and is used by one thread at a time.
#ifndef SPARSEKV_SERVICE_HANDLERS_H_
#define SPARSEKV_SERVICE_HANDLERS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/session_store.h"
#include "service/auth.h"
#include "service/metrics.h"
#include "sparsekv/v1/kv_cache.pb.h"

namespace sparsekv::service {

struct ServiceLimits {
  // Largest message accepted and sent (reported by GetServerInfo); ReadKV, ExportSession and
  // ListSessions size their responses under it.
  int64_t max_message_bytes = 64 << 20;
  // Largest K+V payload per ReadKV response message; stays under gRPC's default 4 MiB client
  // receive limit so that clients need no special channel settings.
  int64_t read_chunk_bytes = 2 << 20;
  // Threads for calls that may block (Flush), kept off gRPC's callback threads.
  int blocking_threads = 2;
};

// "message 3 of the stream" (index 2): how stream errors name the message that failed.
std::string StreamMessage(int64_t index);

class Handlers {
 public:
  // `store` and `metrics` must outlive the handlers.
  Handlers(SessionStore* store, Metrics* metrics, BuildInfo build, ServiceLimits limits);

  // From now on new requests get UNAVAILABLE; running ones finish.
  void BeginShutdown() { shutting_down_.store(true); }
  // UNAVAILABLE while shutting down.
  absl::Status CheckServing() const;

  // Unary RPCs. `cancel` is asked once before anything is applied (deadline, cancellation).
  // CreateSession: an empty tenant is the caller's; PERMISSION_DENIED when a user names
  // another. ListSessions: a user lists its own tenant (PERMISSION_DENIED for another), an
  // admin any tenant or all.
  absl::Status CreateSession(const Caller& caller, const v1::CreateSessionRequest& req,
                             const CancelCheck& cancel, v1::Session* out);
  absl::Status GetSession(const Caller& caller, const v1::GetSessionRequest& req, v1::Session* out);
  absl::Status ListSessions(const Caller& caller, const v1::ListSessionsRequest& req,
                            v1::ListSessionsResponse* out);
  absl::Status DeleteSession(const Caller& caller, const v1::DeleteSessionRequest& req,
                             v1::DeleteSessionResponse* out);
  // Decode: checks and converts `req`, hands its items to the store's decode batcher and
  // returns; `done` runs with the request's status once `out` is filled (on the batcher's
  // thread, or at once when the request is refused before it). `req` and `out` must stay
  // valid until then.
  void DecodeAsync(const Caller& caller, const v1::DecodeRequest& req, const CancelCheck& cancel,
                   v1::DecodeResponse* out, std::function<void(absl::Status)> done);
  // DecodeAsync, waiting for it (tests, fuzzing).
  absl::Status Decode(const Caller& caller, const v1::DecodeRequest& req, const CancelCheck& cancel,
                      v1::DecodeResponse* out);
  // One DecodeStream request's answer once its status is known: a failed request is answered
  // in `out` (error_code, error_message, no results) and the stream goes on.
  static void AnswerStreamMessage(const v1::DecodeRequest& req, const absl::Status& st,
                                  v1::DecodeResponse* out);
  // DecodeAsync + AnswerStreamMessage, waiting. Returns the request's own status, for metrics.
  absl::Status DecodeStreamMessage(const Caller& caller, const v1::DecodeRequest& req,
                                   v1::DecodeResponse* out);
  // How a DecodeStream ends on a message that does not parse (`parsed`), after `answered`.
  static absl::Status DecodeStreamBroken(const absl::Status& parsed, int64_t answered);
  // Flush in two steps, so that the transport can run the blocking part off its threads:
  // FlushTarget validates (the session must exist), FlushNow compresses and answers.
  absl::StatusOr<std::shared_ptr<Session>> FlushTarget(const Caller& caller,
                                                       const v1::FlushRequest& req,
                                                       const CancelCheck& cancel);
  static void FlushNow(Session& session, v1::FlushResponse* out);
  void ServerInfo(v1::ServerInfo* out) const;

  // Largest snapshot an ImportSession may gather before the session exists: what the budget
  // could hold (16 GiB without one).
  int64_t MaxImportBytes() const;

  SessionStore* store() const { return store_; }
  Metrics* metrics() const { return metrics_; }
  const ServiceLimits& limits() const { return limits_; }

 private:
  friend class AppendCall;
  friend class ReadCall;
  friend class ExportCall;
  friend class ImportCall;

  // The session `id` names, as `caller` may see it: the one lookup of every RPC that names a
  // session. NOT_FOUND for an unknown id and for another tenant's session alike.
  absl::StatusOr<std::shared_ptr<Session>> Find(const Caller& caller, const std::string& id) const;
  // Applies one AppendKV message, all or nothing; returns the token rows appended.
  absl::StatusOr<int64_t> AppendOne(const Caller& caller, const v1::AppendKVRequest& req,
                                    std::string* session_id, const CancelCheck& cancel);
  // Largest tensor payload that fits one outgoing message.
  int64_t PayloadRoom() const;

  SessionStore* const store_;
  Metrics* const metrics_;
  const BuildInfo build_;
  const ServiceLimits limits_;
  std::atomic<bool> shutting_down_{false};
};

// One AppendKV stream: each message is applied as it arrives, all or nothing. The first error
// (bytes that do not parse included) ends the stream with a status naming the message and how
// many were applied before it; those stay applied.
class AppendCall {
 public:
  AppendCall(Handlers* h, Caller caller) : h_(h), caller_(std::move(caller)) {}
  // `parsed` is the transport's parse result of the message (OK when `req` is valid).
  absl::Status Take(const absl::Status& parsed, const v1::AppendKVRequest& req,
                    const CancelCheck& cancel);
  // The client finished sending: the response (messages, tokens, the layers' token counts).
  absl::Status Finish(v1::AppendKVResponse* out);
  int64_t messages() const { return resp_.messages(); }

 private:
  Handlers* const h_;
  const Caller caller_;
  v1::AppendKVResponse resp_;
  std::string session_id_;
};

// One ReadKV stream: one message per layer and token range, each under the message limit.
class ReadCall {
 public:
  // Validates the request: the range must lie inside every layer it names.
  static absl::StatusOr<std::unique_ptr<ReadCall>> Start(Handlers* h, const Caller& caller,
                                                         const v1::ReadKVRequest& req);
  // Fills the next message and returns true, or returns false at the end (`*status` OK) or on
  // an error (`*status` says which).
  bool Next(v1::ReadKVResponse* msg, absl::Status* status);

 private:
  ReadCall() = default;

  std::shared_ptr<Session> session_;
  int layer_ = 0;
  int layer_end_ = 0;
  int64_t token_begin_ = 0;
  int64_t token_count_ = 0;
  int64_t rows_per_msg_ = 0;
  int64_t next_token_ = 0;
};

// One ExportSession stream: the session's snapshot (core/snapshot.h) in pieces under the
// message limit, each with its offset and CRC-32C; the snapshot checks itself as a whole too.
class ExportCall {
 public:
  static absl::StatusOr<std::unique_ptr<ExportCall>> Start(Handlers* h, const Caller& caller,
                                                           const v1::ExportSessionRequest& req);
  // Fills the next piece and returns true, or returns false after the last one (`*status`
  // OK: the pieces are made in memory and cannot fail; the signature is ReadCall's).
  bool Next(v1::SessionChunk* msg, absl::Status* status);

 private:
  ExportCall(std::string bytes, int64_t piece) : bytes_(std::move(bytes)), piece_(piece) {}

  const std::string bytes_;
  const int64_t piece_;
  size_t offset_ = 0;
  bool done_ = false;
};

// One ImportSession stream: gathers the pieces (each checked: version, offset, CRC-32C, size
// cap), then parses and adds the session whole after the last one. Any failure ends the call
// and adds nothing. A user may import sessions of its own tenant only (PERMISSION_DENIED).
class ImportCall {
 public:
  ImportCall(Handlers* h, Caller caller)
      : h_(h), caller_(std::move(caller)), max_bytes_(h->MaxImportBytes()) {}
  // `parsed` is the transport's parse result of the piece.
  absl::Status Take(const absl::Status& parsed, const v1::SessionChunk& piece);
  // True once the last piece was taken: then Finish adds the session.
  bool complete() const { return last_; }
  int64_t pieces() const { return pieces_; }
  absl::Status Finish(v1::Session* out);
  // The status of a stream that ended before its last piece.
  absl::Status EndedEarly() const;

 private:
  Handlers* const h_;
  const Caller caller_;
  const int64_t max_bytes_;
  std::string bytes_;
  int64_t pieces_ = 0;
  bool last_ = false;
};

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_HANDLERS_H_
