// Wire (proto) <-> core conversion and wire-level validation of requests.
//
// Checks here are the ones that need no session: dtype known, byte length consistent with
// shape, dimensions positive. Shape-vs-layout checks belong to core/. Stateless; thread-safe.
#ifndef SPARSEKV_SERVICE_CONVERT_H_
#define SPARSEKV_SERVICE_CONVERT_H_

#include <string>

#include "absl/status/statusor.h"
#include "core/session.h"
#include "core/session_store.h"
#include "core/types.h"
#include "sparsekv/v1/kv_cache.pb.h"

namespace sparsekv::service {

// InvalidArgument unless `d` is FLOAT32/FLOAT16/BFLOAT16.
absl::StatusOr<DType> FromProto(v1::DType d, const char* field);
v1::DType ToProto(DType d);

// A view of `t` (borrowing its data). InvalidArgument naming `field` for an unknown dtype,
// a negative or zero dimension, or a byte length that does not match the shape.
absl::StatusOr<TensorView> ViewTensor(const v1::Tensor& t, const char* field);
// Like ViewTensor, but an unset tensor (no dtype, shape or data) gives an empty view.
absl::StatusOr<TensorView> ViewOptionalTensor(const v1::Tensor& t, const char* field);

absl::StatusOr<CreateSessionParams> FromProto(const v1::CreateSessionRequest& req);
// InvalidArgument for a malformed item.
absl::StatusOr<DecodeInput> FromProto(const v1::DecodeItem& item, const char* field);

void ToProto(const SessionInfo& info, v1::Session* out);
void ToProto(const SessionStats& stats, v1::SessionStats* out);

// Moves `values` (float32) into `out` as `dtype` with the given shape.
void FloatsToTensor(const std::vector<float>& values, std::vector<int64_t> shape, DType dtype,
                    v1::Tensor* out);

}  // namespace sparsekv::service

#endif  // SPARSEKV_SERVICE_CONVERT_H_
