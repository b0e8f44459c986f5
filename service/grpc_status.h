// The one conversion from absl::Status (core/) to grpc::Status (the wire).
#ifndef SPARSEKV_SERVICE_GRPC_STATUS_H_
#define SPARSEKV_SERVICE_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace sparsekv::service {

// Same code (absl and gRPC share the canonical code numbers), same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Canonical upper-case name of a gRPC code ("NOT_FOUND"), for metric labels.
const char* GrpcCodeName(grpc::StatusCode code);

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_GRPC_STATUS_H_
