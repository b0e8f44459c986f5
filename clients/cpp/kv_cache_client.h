// C++ client library of the sparsekv KvCacheService (sparsekv/v1/kv_cache.proto).
//
// KvCacheClient wraps the generated gRPC stub so that callers get absl::Status/StatusOr
// instead of grpc::Status, every call carries a deadline, and the streaming RPCs come as
// plain functions (collect a server stream, feed a client stream from a vector or a
// callback). It also speaks the standard grpc.health.v1 health protocol without needing the
// health proto's generated code. The CLI (clients/cli) is built on it.
#ifndef SPARSEKV_CLIENTS_CPP_KV_CACHE_CLIENT_H_
#define SPARSEKV_CLIENTS_CPP_KV_CACHE_CLIENT_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "sparsekv/v1/kv_cache.grpc.pb.h"

namespace sparsekv {

// Converts a gRPC status to an absl::Status with the same code and message. The numeric
// codes of both are google.rpc.Code values, so the mapping is the identity.
absl::Status FromGrpcStatus(const grpc::Status& status);

// Serving status of grpc.health.v1.HealthCheckResponse (values as in health.proto).
enum class HealthStatus {
  kUnknown = 0,
  kServing = 1,
  kNotServing = 2,
  kServiceUnknown = 3,
};

// Returns "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN".
const char* HealthStatusName(HealthStatus status);

// Encodes a grpc.health.v1.HealthCheckRequest{service} in protobuf wire format. Exposed for
// tests; the health proto's generated code is not shipped by Debian's gRPC packages.
std::string EncodeHealthCheckRequest(absl::string_view service);

// Decodes a grpc.health.v1.HealthCheckResponse{status}. Unknown fields are skipped.
// Returns InvalidArgument on malformed wire data.
absl::StatusOr<HealthStatus> DecodeHealthCheckResponse(absl::string_view bytes);

// An open DecodeStream call: requests go out in order and one response comes back per
// request, in the same order. A request the server rejects yields a response with
// error_code set instead of ending the stream.
//
// Thread-safety: one thread may call Send/WritesDone while another calls Recv; Finish must
// be called once, after the last Recv, by one thread.
class DecodeStream {
 public:
  ~DecodeStream();
  DecodeStream(const DecodeStream&) = delete;
  DecodeStream& operator=(const DecodeStream&) = delete;

  // Sends one request. Returns false when the stream is broken (call Finish for the reason).
  bool Send(const v1::DecodeRequest& request);

  // Half-closes the stream: no more Send calls. Returns false when the stream is broken.
  bool WritesDone();

  // Receives the next response. Returns false at the end of the stream or when it broke.
  bool Recv(v1::DecodeResponse* response);

  // Waits for the end of the call and returns its final status. REQUIRES: every response
  // the caller wants has been read with Recv (Finish may block while responses are unread).
  absl::Status Finish();

 private:
  friend class KvCacheClient;
  DecodeStream(
      std::unique_ptr<grpc::ClientContext> context,
      std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeRequest, v1::DecodeResponse>> stream);

  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeRequest, v1::DecodeResponse>> stream_;
  bool finished_ = false;
};

// Client of one sparsekv server.
//
// Every RPC runs with a deadline of `timeout` from the moment it starts (the constructor's
// default unless set_timeout changed it). Errors are the server's status codes, unchanged;
// a server that cannot be reached gives UNAVAILABLE, a call that runs out of time
// DEADLINE_EXCEEDED.
//
// Thread-safety: all methods may be called concurrently from several threads, except
// set_timeout, which must not race with calls.
// Metadata key every session-scoped call carries: the routing key of a consistent-hash router.
inline constexpr char kSessionHeader[] = "x-session-id";

// Adds `authorization: Bearer TOKEN` to `context` (a server with --auth=token requires it on
// every call); nothing when `token` is empty.
void AddBearerToken(grpc::ClientContext* context, const std::string& token);

class KvCacheClient {
 public:
  // Connects lazily to `target` ("HOST:PORT", or any gRPC target URI) over an insecure
  // channel with no limit on received message size. Nothing is sent until the first call.
  KvCacheClient(const std::string& target, absl::Duration timeout);

  // Uses an existing channel (for example one with TLS credentials, or an in-process one).
  // `target_name` names it in errors.
  KvCacheClient(std::shared_ptr<grpc::Channel> channel, absl::Duration timeout,
                std::string target_name = "(channel)");

  ~KvCacheClient();
  KvCacheClient(const KvCacheClient&) = delete;
  KvCacheClient& operator=(const KvCacheClient&) = delete;

  absl::Duration timeout() const { return timeout_; }
  void set_timeout(absl::Duration timeout) { timeout_ = timeout; }
  // The bearer token every call sends (AddBearerToken); empty = none. Must not race with calls.
  void set_token(std::string token) { token_ = std::move(token); }

  // Waits up to the client's timeout for the channel to connect. Returns OK once connected,
  // UNAVAILABLE (naming the target) when it could not connect in time.
  absl::Status WaitForConnected();

  // Unary RPCs: see kv_cache.proto for the meaning of every field and error code.
  absl::StatusOr<v1::Session> CreateSession(const v1::CreateSessionRequest& request);
  absl::StatusOr<v1::Session> GetSession(const std::string& session_id);
  // One page of sessions.
  absl::StatusOr<v1::ListSessionsResponse> ListSessions(const v1::ListSessionsRequest& request);
  // Every session (of `tenant`, or of all tenants when empty), following next_page_token.
  // Each page gets its own deadline.
  absl::StatusOr<std::vector<v1::Session>> ListAllSessions(const std::string& tenant,
                                                           uint32_t page_size = 0);
  absl::StatusOr<v1::DeleteSessionResponse> DeleteSession(const std::string& session_id);
  absl::StatusOr<v1::DecodeResponse> Decode(const v1::DecodeRequest& request);
  absl::StatusOr<v1::FlushResponse> Flush(const std::string& session_id);
  absl::StatusOr<v1::ServerInfo> GetServerInfo();

  // AppendKV client stream. `next` fills the message it is given and returns true, or
  // returns false when there are no more messages; it is called once per message, so a
  // large upload never needs to be held in memory at once. The deadline covers the whole
  // stream. Returns the server's status; when the server ends the stream early (an error),
  // that error is returned and `next` is not called again.
  absl::StatusOr<v1::AppendKVResponse> AppendKV(
      const std::function<bool(v1::AppendKVRequest*)>& next);
  // Same, sending `requests` in order.
  absl::StatusOr<v1::AppendKVResponse> AppendKV(const std::vector<v1::AppendKVRequest>& requests);

  // ReadKV server stream: calls `on_response` for every message as it arrives; returning a
  // non-OK status from it cancels the call and returns that status.
  absl::Status ReadKV(const v1::ReadKVRequest& request,
                      const std::function<absl::Status(const v1::ReadKVResponse&)>& on_response);
  // Same, collecting every message.
  absl::StatusOr<std::vector<v1::ReadKVResponse>> ReadKV(const v1::ReadKVRequest& request);

  // ExportSession server stream, collected; and ImportSession client stream.
  absl::StatusOr<std::vector<v1::SessionChunk>> ExportSession(const std::string& session_id);
  absl::StatusOr<v1::Session> ImportSession(const std::vector<v1::SessionChunk>& chunks);

  // Opens a DecodeStream whose deadline is `stream_timeout` from now (a stream usually lives
  // for a whole generation, longer than one call's timeout). Never fails: a stream that
  // cannot start reports it through Send/Recv returning false and Finish's status.
  std::unique_ptr<DecodeStream> OpenDecodeStream(absl::Duration stream_timeout);

  // grpc.health.v1.Health/Check for `service` ("" = the whole server). Returns the serving
  // status; UNIMPLEMENTED when the server has no health service, NOT_FOUND when it does not
  // know `service`, UNAVAILABLE when it cannot be reached.
  absl::StatusOr<HealthStatus> CheckHealth(const std::string& service = "");

 private:
  // A context with the default deadline, the bearer token and, for a session's calls, its
  // routing header.
  std::unique_ptr<grpc::ClientContext> NewContext(const std::string& session_id = "") const;

  std::string target_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCacheService::Stub> stub_;
  absl::Duration timeout_;
  std::string token_;
};

}  // namespace sparsekv

#endif  // SPARSEKV_CLIENTS_CPP_KV_CACHE_CLIENT_H_
