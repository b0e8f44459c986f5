#include "clients/cli/json_writer.h"

#include <cmath>
#include <limits>
#include <string>

#include "gtest/gtest.h"

namespace sparsekv::cli {
namespace {

TEST(JsonQuoteTest, EscapesQuotesBackslashesAndControlCharacters) {
  EXPECT_EQ(JsonQuote(""), "\"\"");
  EXPECT_EQ(JsonQuote("plain"), "\"plain\"");
  EXPECT_EQ(JsonQuote("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(JsonQuote("\n\r\t\b\f"), "\"\\n\\r\\t\\b\\f\"");
  EXPECT_EQ(JsonQuote(std::string("\x01\x1f\x7f", 3)), "\"\\u0001\\u001f\\u007f\"");
  EXPECT_EQ(JsonQuote(std::string("nul\0x", 5)), "\"nul\\u0000x\"");
  // Slash needs no escape; UTF-8 passes through unchanged.
  EXPECT_EQ(JsonQuote("a/b"), "\"a/b\"");
  EXPECT_EQ(JsonQuote("h\xc3\xa9"), "\"h\xc3\xa9\"");
}

TEST(JsonWriterTest, PlacesCommasInNestedContainers) {
  JsonWriter w;
  w.BeginObject();
  w.Key("a").Int(-1);
  w.Key("b").BeginArray().Uint(1).Uint(2).BeginArray().EndArray().BeginObject().EndObject();
  w.EndArray();
  w.Key("c").BeginObject().Key("d").Bool(true).Key("e").Null().EndObject();
  w.Key("s").String("x\"y");
  w.EndObject();
  EXPECT_EQ(w.str(), R"({"a":-1,"b":[1,2,[],{}],"c":{"d":true,"e":null},"s":"x\"y"})");
}

TEST(JsonWriterTest, EscapesKeys) {
  JsonWriter w;
  w.BeginObject().Key("k\n\"").String("v").EndObject();
  EXPECT_EQ(w.str(), "{\"k\\n\\\"\":\"v\"}");
}

TEST(JsonWriterTest, WritesNumbersThatReadBackExactly) {
  JsonWriter w;
  w.BeginArray().Float(0.1f).Float(-2.5f).Double(0.1).Float(1e-30f).EndArray();
  EXPECT_EQ(w.str(), "[0.100000001,-2.5,0.10000000000000001,1e-30]");
  EXPECT_EQ(std::stof("0.100000001"), 0.1f);
}

TEST(JsonWriterTest, WritesNonFiniteAsNull) {
  JsonWriter w;
  w.BeginArray()
      .Float(std::numeric_limits<float>::quiet_NaN())
      .Float(std::numeric_limits<float>::infinity())
      .Double(-std::numeric_limits<double>::infinity())
      .EndArray();
  EXPECT_EQ(w.str(), "[null,null,null]");
}

}  // namespace
}  // namespace sparsekv::cli
