// Request and response bytes <-> proto messages for the raw (ByteBuffer) handlers. The
// service parses requests itself rather than letting gRPC do it, so that bytes which do not
// parse get INVALID_ARGUMENT naming the message type (and, in a stream, the message's
// position) instead of gRPC's empty UNIMPLEMENTED or a silently ended stream.
//
// Stateless; thread-safe.
#ifndef SPARSEKV_SERVICE_WIRE_H_
#define SPARSEKV_SERVICE_WIRE_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "sparsekv/v1/kv_cache.pb.h"

namespace sparsekv::service {

// The status of `size` bytes that do not parse as a Message.
template <typename Message>
absl::Status NotParsed(size_t size, const std::string& where) {
  return absl::InvalidArgumentError(absl::StrCat(where.empty() ? "request" : where, " (", size,
                                                 " bytes) does not parse as ",
                                                 Message::descriptor()->full_name()));
}

// Parses `bytes` into `msg`. InvalidArgument naming the type and `where` (e.g. "message 3 of
// the stream"; empty for a unary request) when they do not parse.
template <typename Message>
absl::Status ParseMessage(const grpc::ByteBuffer& bytes, Message* msg, const std::string& where) {
  grpc::ByteBuffer copy(bytes);  // shares the slices; the reader consumes its buffer
  grpc::ProtoBufferReader reader(&copy);
  msg->Clear();
  if (!msg->ParseFromZeroCopyStream(&reader)) return NotParsed<Message>(bytes.Length(), where);
  return absl::OkStatus();
}

// The same for bytes in memory (tests/fuzz's direct driver, which has no gRPC call).
template <typename Message>
absl::Status ParseMessage(std::string_view bytes, Message* msg, const std::string& where) {
  msg->Clear();
  if (!msg->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return NotParsed<Message>(bytes.size(), where);
  }
  return absl::OkStatus();
}

// Serializes `msg` into `out` (replacing its contents).
template <typename Message>
void SerializeMessage(const Message& msg, grpc::ByteBuffer* out) {
  out->Clear();
  const size_t size = msg.ByteSizeLong();
  grpc::ProtoBufferWriter writer(out, grpc::kProtoBufferWriterMaxBufferLength,
                                 static_cast<int>(size));
  msg.SerializeToZeroCopyStream(&writer);
}

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_WIRE_H_
