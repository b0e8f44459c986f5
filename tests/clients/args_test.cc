#include "clients/cli/args.h"

#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "gtest/gtest.h"

namespace sparsekv::cli {
namespace {

absl::StatusOr<Invocation> Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "sparsekv");
  return ParseArgs(args);
}

TEST(ArgsTest, NoArgumentsMeansHelp) {
  absl::FlagSaver saver;
  absl::StatusOr<Invocation> inv = Parse({});
  ASSERT_TRUE(inv.ok());
  EXPECT_EQ(inv->command, "help");
  inv = Parse({"--help"});
  ASSERT_TRUE(inv.ok());
  EXPECT_EQ(inv->command, "help");
  inv = Parse({"attend", "-h"});
  ASSERT_TRUE(inv.ok());
  EXPECT_EQ(inv->command, "help");
  EXPECT_EQ(inv->positional, std::vector<std::string>{"attend"});
}

TEST(ArgsTest, ParsesGlobalAndCommandFlagsInAnyPosition) {
  absl::FlagSaver saver;
  absl::StatusOr<Invocation> inv =
      Parse({"--server=h:1", "--json", "create", "--layers", "4", "--kv_heads=2", "-q_heads", "8",
             "--head_dim=64", "--timeout", "2s", "--ttl=1h", "--dtype", "bfloat16"});
  ASSERT_TRUE(inv.ok()) << inv.status();
  EXPECT_EQ(inv->command, "create");
  EXPECT_TRUE(inv->positional.empty());
  EXPECT_EQ(absl::GetFlag(FLAGS_server), "h:1");
  EXPECT_TRUE(absl::GetFlag(FLAGS_json));
  EXPECT_EQ(absl::GetFlag(FLAGS_layers), 4u);
  EXPECT_EQ(absl::GetFlag(FLAGS_kv_heads), 2u);
  EXPECT_EQ(absl::GetFlag(FLAGS_q_heads), 8u);
  EXPECT_EQ(absl::GetFlag(FLAGS_head_dim), 64u);
  EXPECT_EQ(absl::GetFlag(FLAGS_timeout), absl::Seconds(2));
  EXPECT_EQ(absl::GetFlag(FLAGS_ttl), absl::Hours(1));
  EXPECT_EQ(absl::GetFlag(FLAGS_dtype), "bfloat16");
  EXPECT_TRUE(inv->Has("layers"));
  EXPECT_FALSE(inv->Has("tenant"));
}

TEST(ArgsTest, CollectsRepeatedLabelsWithCommas) {
  absl::FlagSaver saver;
  absl::StatusOr<Invocation> inv = Parse({"create", "--label", "a=1,2", "--label=b=x"});
  ASSERT_TRUE(inv.ok()) << inv.status();
  EXPECT_EQ(inv->labels, (std::vector<std::string>{"a=1,2", "b=x"}));
}

TEST(ArgsTest, BooleanFlagsTakeNoSeparateValue) {
  absl::FlagSaver saver;
  absl::StatusOr<Invocation> inv = Parse({"attend", "--lse", "s1", "--layer", "0", "--q=q.npy"});
  ASSERT_TRUE(inv.ok()) << inv.status();
  EXPECT_EQ(inv->positional, std::vector<std::string>{"s1"});
  EXPECT_TRUE(absl::GetFlag(FLAGS_lse));
  EXPECT_EQ(absl::GetFlag(FLAGS_layer), 0);
  inv = Parse({"attend", "s1", "--nolse", "--json=false"});
  ASSERT_TRUE(inv.ok()) << inv.status();
  EXPECT_FALSE(absl::GetFlag(FLAGS_lse));
  EXPECT_FALSE(absl::GetFlag(FLAGS_json));
}

TEST(ArgsTest, DecodeComputeTakesDashesOrUnderscores) {
  absl::FlagSaver saver;
  for (const char* cmd : {"create", "demo", "bench"}) {
    absl::StatusOr<Invocation> inv = Parse({cmd, "--decode-compute", "f16"});
    ASSERT_TRUE(inv.ok()) << cmd << ": " << inv.status();
    EXPECT_TRUE(inv->Has("decode_compute")) << cmd;
    EXPECT_EQ(absl::GetFlag(FLAGS_decode_compute), "f16") << cmd;
  }
  absl::StatusOr<Invocation> inv = Parse({"create", "--decode_compute=f32"});
  ASSERT_TRUE(inv.ok()) << inv.status();
  EXPECT_EQ(absl::GetFlag(FLAGS_decode_compute), "f32");
  inv = Parse({"list", "--decode-compute=f16"});  // not a flag of list
  EXPECT_EQ(inv.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(inv.status().message().find("--decode_compute"), std::string::npos) << inv.status();
  inv = Parse({"create", "--decode-comput=f16"});  // unknown: named as typed
  EXPECT_EQ(inv.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(inv.status().message().find("--decode-comput"), std::string::npos) << inv.status();
  const std::string usage = UsageText("create");
  EXPECT_NE(usage.find("--decode_compute"), std::string::npos);
  EXPECT_NE(usage.find("AVX512-FP16"), std::string::npos);
}

TEST(ArgsTest, DoubleDashEndsOptions) {
  absl::FlagSaver saver;
  absl::StatusOr<Invocation> inv = Parse({"get", "--", "-weird-id"});
  ASSERT_TRUE(inv.ok()) << inv.status();
  EXPECT_EQ(inv->positional, std::vector<std::string>{"-weird-id"});
}

TEST(ArgsTest, RejectsUsageErrors) {
  absl::FlagSaver saver;
  const std::vector<std::vector<std::string>> bad = {
      {"frobnicate"},                      // unknown command
      {"list", "--bogus=1"},               // unknown flag
      {"list", "--layers", "3"},           // flag of another command
      {"create", "--layers", "many"},      // unparsable value
      {"create", "--layers"},              // missing value
      {"create", "--ttl", "10"},           // duration without unit
      {"get"},                             // missing ID
      {"get", "a", "b"},                   // extra argument
      {"info", "x"},                       // takes no arguments
      {"list", "--flagfile=/etc/passwd"},  // Abseil's own flags are not offered
      {"--nolayers", "create"},            // --noX only for booleans
  };
  for (const auto& args : bad) {
    absl::StatusOr<Invocation> inv = Parse(args);
    EXPECT_EQ(inv.status().code(), absl::StatusCode::kInvalidArgument) << args[0];
    EXPECT_FALSE(inv.status().message().empty());
  }
}

TEST(ArgsTest, UsageListsCommandsAndFlags) {
  const std::string all = UsageText("");
  for (const CommandSpec& c : Commands()) {
    EXPECT_NE(all.find(c.name), std::string::npos) << c.name;
  }
  const std::string create = UsageText("create");
  EXPECT_NE(create.find("--kv_heads"), std::string::npos);
  EXPECT_NE(create.find("--server"), std::string::npos);
  EXPECT_NE(create.find("default float16"), std::string::npos);
}

}  // namespace
}  // namespace sparsekv::cli
