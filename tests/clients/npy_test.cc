#include "clients/cli/npy.h"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace sparsekv::cli {
namespace {

NpyArray MakeFloat32(std::vector<int64_t> shape) {
  NpyArray a;
  a.dtype = NpyDType::kFloat32;
  a.shape = std::move(shape);
  std::vector<float> values(static_cast<size_t>(a.NumElements()));
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * static_cast<float>(i) - 3.0f;
  a.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return a;
}

// A .npy file with the given header dictionary text (version 1.0) and data bytes.
std::string NpyWithHeader(const std::string& dict, const std::string& data, char major = 1) {
  std::string header = dict + "\n";
  std::string out("\x93NUMPY", 6);
  out.push_back(major);
  out.push_back(0);
  if (major == 1) {
    out.push_back(static_cast<char>(header.size() & 0xff));
    out.push_back(static_cast<char>(header.size() >> 8));
  } else {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  }
  return out + header + data;
}

TEST(NpyTest, RoundTripsFloat32) {
  const NpyArray a = MakeFloat32({2, 3, 4});
  absl::StatusOr<std::string> bytes = SerializeNpy(a);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<NpyArray> b = ParseNpy(*bytes);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->dtype, NpyDType::kFloat32);
  EXPECT_EQ(b->shape, a.shape);
  EXPECT_EQ(b->data, a.data);
}

TEST(NpyTest, RoundTripsFloat16AndOddShapes) {
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{}, {7}, {1, 1}, {0, 5}, {3, 2, 2, 5}}) {
    NpyArray a;
    a.dtype = NpyDType::kFloat16;
    a.shape = shape;
    for (int64_t i = 0; i < a.NumElements(); ++i) {
      a.data.push_back(static_cast<char>(i));
      a.data.push_back(static_cast<char>(0x3c));
    }
    absl::StatusOr<std::string> bytes = SerializeNpy(a);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    absl::StatusOr<NpyArray> b = ParseNpy(*bytes);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(b->dtype, NpyDType::kFloat16);
    EXPECT_EQ(b->shape, shape);
    EXPECT_EQ(b->data, a.data);
  }
}

TEST(NpyTest, HeaderIsPaddedTo64BytesLikeNumpy) {
  absl::StatusOr<std::string> bytes = SerializeNpy(MakeFloat32({3}));
  ASSERT_TRUE(bytes.ok());
  const size_t header_len =
      static_cast<uint8_t>((*bytes)[8]) | (static_cast<uint8_t>((*bytes)[9]) << 8);
  EXPECT_EQ((10 + header_len) % 64, 0u);
  EXPECT_EQ((*bytes)[10 + header_len - 1], '\n');
  // One-element shapes are Python 1-tuples.
  EXPECT_NE(bytes->find("'shape': (3,)"), std::string::npos);
}

TEST(NpyTest, ParsesVersion2AndLooseHeaders) {
  const std::string data(8, '\0');
  absl::StatusOr<NpyArray> a =
      ParseNpy(NpyWithHeader("{'shape': (2,),'fortran_order':False,  \"descr\": '<f4'}", data, 2));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shape, std::vector<int64_t>{2});
  // Python 2 era long suffix.
  a = ParseNpy(
      NpyWithHeader("{'descr': '<f2', 'fortran_order': False, 'shape': (2L, 2L), }", data));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 2}));
}

TEST(NpyTest, RejectsFortranOrder) {
  absl::StatusOr<NpyArray> a = ParseNpy(NpyWithHeader(
      "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", std::string(16, '\0')));
  ASSERT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(a.status().message().find("fortran_order"), std::string::npos);
}

TEST(NpyTest, RejectsOtherDtypesNamingThem) {
  for (const char* descr : {"<f8", ">f4", "<i4", "|u1", "<c8", "|b1"}) {
    absl::StatusOr<NpyArray> a = ParseNpy(NpyWithHeader(
        std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (1,), }",
        std::string(8, '\0')));
    ASSERT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << descr;
    EXPECT_NE(a.status().message().find(descr), std::string::npos) << a.status();
  }
  absl::StatusOr<NpyArray> a = ParseNpy(NpyWithHeader(
      "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", std::string(4, '\0')));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NpyTest, RejectsMalformedFiles) {
  const std::string ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  struct Case {
    const char* name;
    std::string bytes;
  };
  std::string bad_version = NpyWithHeader(ok_dict, std::string(8, '\0'));
  bad_version[6] = 9;
  std::string truncated_header = NpyWithHeader(ok_dict, "").substr(0, 20);
  const Case cases[] = {
      {"empty", ""},
      {"bad magic", "\x93NUMPZ\x01\x00\x00\x00"},
      {"bad version", bad_version},
      {"truncated header", truncated_header},
      {"short data", NpyWithHeader(ok_dict, std::string(7, '\0'))},
      {"long data", NpyWithHeader(ok_dict, std::string(9, '\0'))},
      {"missing shape", NpyWithHeader("{'descr': '<f4', 'fortran_order': False}", "")},
      {"unknown key", NpyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (), "
                                    "'x': 1}",
                                    std::string(4, '\0'))},
      {"not a dict", NpyWithHeader("('<f4', False, (2,))", std::string(8, '\0'))},
      {"bad shape", NpyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }",
                                  std::string(8, '\0'))},
      {"negative dim", NpyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }",
                                     std::string(8, '\0'))},
      {"huge shape", NpyWithHeader("{'descr': '<f4', 'fortran_order': False, "
                                   "'shape': (4294967296, 4294967296, 4294967296), }",
                                   "")},
  };
  for (const Case& c : cases) {
    absl::StatusOr<NpyArray> a = ParseNpy(c.bytes);
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
  }
}

TEST(NpyTest, SerializeRejectsSizeMismatch) {
  NpyArray a = MakeFloat32({2, 2});
  a.data.pop_back();
  EXPECT_EQ(SerializeNpy(a).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NpyTest, FileRoundTripAndMissingFile) {
  const std::string path = testing::TempDir() + "/npy_test_roundtrip.npy";
  const NpyArray a = MakeFloat32({4, 5});
  ASSERT_TRUE(WriteNpyFile(path, a).ok());
  absl::StatusOr<NpyArray> b = ReadNpyFile(path);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->data, a.data);
  std::remove(path.c_str());

  absl::StatusOr<NpyArray> missing = ReadNpyFile(path);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find(path), std::string::npos);
  EXPECT_EQ(WriteNpyFile("/nonexistent-dir/x.npy", a).code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace sparsekv::cli
