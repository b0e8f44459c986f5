#include "clients/cpp/kv_cache_client.h"

#include <string>

#include "gtest/gtest.h"

namespace sparsekv {
namespace {

TEST(KvCacheClientTest, ConvertsGrpcStatusKeepingCodeAndMessage) {
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
  const absl::Status s = FromGrpcStatus(grpc::Status(grpc::StatusCode::NOT_FOUND, "no session x"));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "no session x");
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::UNAVAILABLE, "")).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "")).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(HealthCodecTest, EncodesRequest) {
  EXPECT_EQ(EncodeHealthCheckRequest(""), "");
  EXPECT_EQ(EncodeHealthCheckRequest("abc"), std::string("\x0a\x03"
                                                         "abc",
                                                         5));
  const std::string long_name(200, 'x');
  const std::string encoded = EncodeHealthCheckRequest(long_name);
  // 200 needs a two-byte varint: 0xc8 0x01.
  EXPECT_EQ(encoded.substr(0, 3), std::string("\x0a\xc8\x01", 3));
  EXPECT_EQ(encoded.size(), 203u);
}

TEST(HealthCodecTest, DecodesResponse) {
  EXPECT_EQ(*DecodeHealthCheckResponse(""), HealthStatus::kUnknown);
  EXPECT_EQ(*DecodeHealthCheckResponse(std::string("\x08\x01", 2)), HealthStatus::kServing);
  EXPECT_EQ(*DecodeHealthCheckResponse(std::string("\x08\x02", 2)), HealthStatus::kNotServing);
  // Unknown fields of every wire type are skipped.
  EXPECT_EQ(*DecodeHealthCheckResponse(std::string("\x12\x02hi\x19"
                                                   "12345678\x25"
                                                   "1234\x08\x01",
                                                   20)),
            HealthStatus::kServing);
  // Values the enum does not name read as UNKNOWN.
  EXPECT_EQ(*DecodeHealthCheckResponse(std::string("\x08\x09", 2)), HealthStatus::kUnknown);
  EXPECT_EQ(DecodeHealthCheckResponse(std::string("\x08", 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeHealthCheckResponse(std::string("\x12\x05hi", 4)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeHealthCheckResponse(std::string("\x0b", 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_STREQ(HealthStatusName(HealthStatus::kNotServing), "NOT_SERVING");
}

}  // namespace
}  // namespace sparsekv
