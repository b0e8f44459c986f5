#include "clients/cpp/kv_cache_client.h"

#include <chrono>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/support/byte_buffer.h"

namespace sparsekv {
namespace {

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration timeout) {
  return std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout);
}

// Appends `value` as a protobuf base-128 varint.
void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

// Reads a varint at *pos. Returns false on truncated or over-long input.
bool ReadVarint(absl::string_view bytes, size_t* pos, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (*pos >= bytes.size()) return false;
    const uint8_t b = static_cast<uint8_t>(bytes[(*pos)++]);
    *value |= static_cast<uint64_t>(b & 0x7f) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

const char* HealthStatusName(HealthStatus status) {
  switch (status) {
    case HealthStatus::kUnknown:
      return "UNKNOWN";
    case HealthStatus::kServing:
      return "SERVING";
    case HealthStatus::kNotServing:
      return "NOT_SERVING";
    case HealthStatus::kServiceUnknown:
      return "SERVICE_UNKNOWN";
  }
  return "UNKNOWN";
}

std::string EncodeHealthCheckRequest(absl::string_view service) {
  std::string out;
  // proto3 omits an empty string field, so the whole-server check is an empty message.
  if (service.empty()) return out;
  out.push_back(0x0a);  // field 1, wire type 2 (length-delimited)
  AppendVarint(service.size(), &out);
  out.append(service.data(), service.size());
  return out;
}

absl::StatusOr<HealthStatus> DecodeHealthCheckResponse(absl::string_view bytes) {
  uint64_t status = 0;  // proto3 default when the field is absent: UNKNOWN
  size_t pos = 0;
  while (pos < bytes.size()) {
    uint64_t tag;
    if (!ReadVarint(bytes, &pos, &tag)) {
      return absl::InvalidArgumentError("malformed HealthCheckResponse: bad tag");
    }
    const uint64_t field = tag >> 3;
    const uint64_t wire_type = tag & 7;
    uint64_t value;
    switch (wire_type) {
      case 0:  // varint
        if (!ReadVarint(bytes, &pos, &value)) {
          return absl::InvalidArgumentError("malformed HealthCheckResponse: bad varint");
        }
        if (field == 1) status = value;
        break;
      case 1:  // 64-bit
        if (bytes.size() - pos < 8) {
          return absl::InvalidArgumentError("malformed HealthCheckResponse: truncated");
        }
        pos += 8;
        break;
      case 2:  // length-delimited
        if (!ReadVarint(bytes, &pos, &value) || value > bytes.size() - pos) {
          return absl::InvalidArgumentError("malformed HealthCheckResponse: bad length");
        }
        pos += value;
        break;
      case 5:  // 32-bit
        if (bytes.size() - pos < 4) {
          return absl::InvalidArgumentError("malformed HealthCheckResponse: truncated");
        }
        pos += 4;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("malformed HealthCheckResponse: wire type ", wire_type));
    }
  }
  // Values the enum does not name are reported as UNKNOWN rather than as an error: a newer
  // server may add states.
  if (status > static_cast<uint64_t>(HealthStatus::kServiceUnknown)) return HealthStatus::kUnknown;
  return static_cast<HealthStatus>(status);
}

DecodeStream::DecodeStream(
    std::unique_ptr<grpc::ClientContext> context,
    std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeRequest, v1::DecodeResponse>> stream)
    : context_(std::move(context)), stream_(std::move(stream)) {}

DecodeStream::~DecodeStream() {
  if (!finished_) {
    // Abandoning an open call: cancel it so that Finish cannot wait on unread responses.
    context_->TryCancel();
    stream_->Finish().IgnoreError();
  }
}

bool DecodeStream::Send(const v1::DecodeRequest& request) { return stream_->Write(request); }

bool DecodeStream::WritesDone() { return stream_->WritesDone(); }

bool DecodeStream::Recv(v1::DecodeResponse* response) { return stream_->Read(response); }

absl::Status DecodeStream::Finish() {
  finished_ = true;
  return FromGrpcStatus(stream_->Finish());
}

namespace {

std::shared_ptr<grpc::Channel> NewInsecureChannel(const std::string& target) {
  grpc::ChannelArguments args;
  // gRPC's default 4 MiB receive limit would refuse a large ReadKV or ExportSession message;
  // the server bounds what it sends.
  args.SetMaxReceiveMessageSize(-1);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

void AddBearerToken(grpc::ClientContext* context, const std::string& token) {
  if (!token.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", token));
}

KvCacheClient::KvCacheClient(const std::string& target, absl::Duration timeout)
    : KvCacheClient(NewInsecureChannel(target), timeout) {
  target_ = target;
}

KvCacheClient::KvCacheClient(std::shared_ptr<grpc::Channel> channel, absl::Duration timeout,
                             std::string target_name)
    : target_(std::move(target_name)),
      channel_(std::move(channel)),
      stub_(v1::KvCacheService::NewStub(channel_)),
      timeout_(timeout) {}

KvCacheClient::~KvCacheClient() = default;

std::unique_ptr<grpc::ClientContext> KvCacheClient::NewContext(
    const std::string& session_id) const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(DeadlineAfter(timeout_));
  // The routing key of a consistent-hash router (nginx, ingress-nginx, gRPC ring hash): calls
  // of one session reach the replica that holds it.
  if (!session_id.empty()) context->AddMetadata(kSessionHeader, session_id);
  AddBearerToken(context.get(), token_);
  return context;
}

absl::Status KvCacheClient::WaitForConnected() {
  if (channel_->WaitForConnected(DeadlineAfter(timeout_))) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("cannot connect to ", target_, " within ", absl::FormatDuration(timeout_)));
}

absl::StatusOr<v1::Session> KvCacheClient::CreateSession(const v1::CreateSessionRequest& request) {
  v1::Session response;
  auto context = NewContext(request.session_id());
  absl::Status status = FromGrpcStatus(stub_->CreateSession(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::Session> KvCacheClient::GetSession(const std::string& session_id) {
  v1::GetSessionRequest request;
  request.set_session_id(session_id);
  v1::Session response;
  auto context = NewContext(session_id);
  absl::Status status = FromGrpcStatus(stub_->GetSession(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ListSessionsResponse> KvCacheClient::ListSessions(
    const v1::ListSessionsRequest& request) {
  v1::ListSessionsResponse response;
  auto context = NewContext();
  absl::Status status = FromGrpcStatus(stub_->ListSessions(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<std::vector<v1::Session>> KvCacheClient::ListAllSessions(const std::string& tenant,
                                                                        uint32_t page_size) {
  std::vector<v1::Session> sessions;
  v1::ListSessionsRequest request;
  request.set_tenant(tenant);
  request.set_page_size(page_size);
  while (true) {
    absl::StatusOr<v1::ListSessionsResponse> page = ListSessions(request);
    if (!page.ok()) return page.status();
    for (v1::Session& s : *page->mutable_sessions()) sessions.push_back(std::move(s));
    if (page->next_page_token().empty()) break;
    // A server that hands back the token it was given would make this loop forever.
    if (page->next_page_token() == request.page_token()) {
      return absl::InternalError("ListSessions returned the same page token twice");
    }
    request.set_page_token(page->next_page_token());
  }
  return sessions;
}

absl::StatusOr<v1::DeleteSessionResponse> KvCacheClient::DeleteSession(
    const std::string& session_id) {
  v1::DeleteSessionRequest request;
  request.set_session_id(session_id);
  v1::DeleteSessionResponse response;
  auto context = NewContext(session_id);
  absl::Status status = FromGrpcStatus(stub_->DeleteSession(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::DecodeResponse> KvCacheClient::Decode(const v1::DecodeRequest& request) {
  v1::DecodeResponse response;
  auto context = NewContext(request.items_size() > 0 ? request.items(0).session_id() : "");
  absl::Status status = FromGrpcStatus(stub_->Decode(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::FlushResponse> KvCacheClient::Flush(const std::string& session_id) {
  v1::FlushRequest request;
  request.set_session_id(session_id);
  v1::FlushResponse response;
  auto context = NewContext(session_id);
  absl::Status status = FromGrpcStatus(stub_->Flush(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::ServerInfo> KvCacheClient::GetServerInfo() {
  v1::GetServerInfoRequest request;
  v1::ServerInfo response;
  auto context = NewContext();
  absl::Status status = FromGrpcStatus(stub_->GetServerInfo(context.get(), request, &response));
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::AppendKVResponse> KvCacheClient::AppendKV(
    const std::function<bool(v1::AppendKVRequest*)>& next) {
  v1::AppendKVResponse response;
  // The first message names the session the stream is routed by.
  v1::AppendKVRequest request;
  bool more = next(&request);
  auto context = NewContext(more ? request.session_id() : "");
  std::unique_ptr<grpc::ClientWriter<v1::AppendKVRequest>> writer =
      stub_->AppendKV(context.get(), &response);
  while (more) {
    // Write fails once the server has ended the call (typically with an error); Finish
    // then returns that error.
    if (!writer->Write(request)) break;
    request.Clear();
    more = next(&request);
  }
  writer->WritesDone();
  absl::Status status = FromGrpcStatus(writer->Finish());
  if (!status.ok()) return status;
  return response;
}

absl::StatusOr<v1::AppendKVResponse> KvCacheClient::AppendKV(
    const std::vector<v1::AppendKVRequest>& requests) {
  size_t i = 0;
  return AppendKV([&](v1::AppendKVRequest* request) {
    if (i == requests.size()) return false;
    *request = requests[i++];
    return true;
  });
}

absl::Status KvCacheClient::ReadKV(
    const v1::ReadKVRequest& request,
    const std::function<absl::Status(const v1::ReadKVResponse&)>& on_response) {
  auto context = NewContext(request.session_id());
  std::unique_ptr<grpc::ClientReader<v1::ReadKVResponse>> reader =
      stub_->ReadKV(context.get(), request);
  v1::ReadKVResponse response;
  absl::Status callback_status;
  while (reader->Read(&response)) {
    callback_status = on_response(response);
    if (!callback_status.ok()) {
      context->TryCancel();
      break;
    }
  }
  absl::Status status = FromGrpcStatus(reader->Finish());
  if (!callback_status.ok()) return callback_status;
  return status;
}

absl::StatusOr<std::vector<v1::ReadKVResponse>> KvCacheClient::ReadKV(
    const v1::ReadKVRequest& request) {
  std::vector<v1::ReadKVResponse> responses;
  absl::Status status = ReadKV(request, [&](const v1::ReadKVResponse& r) {
    responses.push_back(r);
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return responses;
}

absl::StatusOr<std::vector<v1::SessionChunk>> KvCacheClient::ExportSession(
    const std::string& session_id) {
  v1::ExportSessionRequest request;
  request.set_session_id(session_id);
  auto context = NewContext(session_id);
  std::unique_ptr<grpc::ClientReader<v1::SessionChunk>> reader =
      stub_->ExportSession(context.get(), request);
  std::vector<v1::SessionChunk> chunks;
  v1::SessionChunk chunk;
  while (reader->Read(&chunk)) chunks.push_back(chunk);
  absl::Status status = FromGrpcStatus(reader->Finish());
  if (!status.ok()) return status;
  return chunks;
}

absl::StatusOr<v1::Session> KvCacheClient::ImportSession(
    const std::vector<v1::SessionChunk>& chunks) {
  v1::Session response;
  auto context = NewContext();
  std::unique_ptr<grpc::ClientWriter<v1::SessionChunk>> writer =
      stub_->ImportSession(context.get(), &response);
  for (const v1::SessionChunk& chunk : chunks) {
    if (!writer->Write(chunk)) break;
  }
  writer->WritesDone();
  absl::Status status = FromGrpcStatus(writer->Finish());
  if (!status.ok()) return status;
  return response;
}

std::unique_ptr<DecodeStream> KvCacheClient::OpenDecodeStream(absl::Duration stream_timeout) {
  auto context = NewContext();
  context->set_deadline(DeadlineAfter(stream_timeout));
  auto stream = stub_->DecodeStream(context.get());
  return std::unique_ptr<DecodeStream>(new DecodeStream(std::move(context), std::move(stream)));
}

absl::StatusOr<HealthStatus> KvCacheClient::CheckHealth(const std::string& service) {
  const std::string request_bytes = EncodeHealthCheckRequest(service);
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  auto context = NewContext();
  grpc::GenericStub stub(channel_);
  grpc::Status rpc_status;
  absl::Notification done;
  // The generic stub offers only the callback form for unary calls; wait for it here.
  stub.UnaryCall(context.get(), kHealthCheckMethod, grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   rpc_status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  absl::Status status = FromGrpcStatus(rpc_status);
  if (!status.ok()) return status;
  std::vector<grpc::Slice> slices;
  grpc::Status dump = response.Dump(&slices);
  if (!dump.ok()) return FromGrpcStatus(dump);
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return DecodeHealthCheckResponse(bytes);
}

}  // namespace sparsekv
