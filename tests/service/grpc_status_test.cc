#include "service/grpc_status.h"

#include <gtest/gtest.h>

namespace sparsekv::service {
namespace {

TEST(GrpcStatusTest, KeepsCodeAndMessage) {
  for (auto code : {absl::StatusCode::kInvalidArgument, absl::StatusCode::kNotFound,
                    absl::StatusCode::kResourceExhausted, absl::StatusCode::kUnimplemented,
                    absl::StatusCode::kUnavailable, absl::StatusCode::kAborted}) {
    grpc::Status g = ToGrpcStatus(absl::Status(code, "why"));
    EXPECT_EQ(static_cast<int>(g.error_code()), static_cast<int>(code));
    EXPECT_EQ(g.error_message(), "why");
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_STREQ(GrpcCodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
}

}  // namespace
}  // namespace sparsekv::service
