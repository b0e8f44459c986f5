// A minimal streaming JSON writer for the CLI's --json output.
//
// The CLI prints one JSON object per command; this writer builds it into a string with
// correct separators and string escaping, so command code only names keys and values.
// It does not validate nesting beyond what is needed to place commas: callers pair
// Begin/End calls and put a Key before each value inside an object.
//
// Thread-safety: none; one writer per output.
#ifndef SPARSEKV_CLIENTS_CLI_JSON_WRITER_H_
#define SPARSEKV_CLIENTS_CLI_JSON_WRITER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace sparsekv::cli {

// Returns `s` as a JSON string literal, quotes included: `"` and `\` are escaped, control
// characters become \n, \t, ... or \u00XX, and bytes >= 0x80 pass through (UTF-8 text stays
// readable; proto strings are UTF-8).
std::string JsonQuote(absl::string_view s);

class JsonWriter {
 public:
  JsonWriter() = default;

  JsonWriter& BeginObject();
  JsonWriter& EndObject();
  JsonWriter& BeginArray();
  JsonWriter& EndArray();
  // Object key; the next call writes its value.
  JsonWriter& Key(absl::string_view key);

  JsonWriter& String(absl::string_view value);
  JsonWriter& Int(int64_t value);
  JsonWriter& Uint(uint64_t value);
  JsonWriter& Bool(bool value);
  JsonWriter& Null();
  // Shortest form that reads back as the same float (%.9g); NaN and infinities, which JSON
  // cannot express, are written as null.
  JsonWriter& Float(float value);
  // Same for double (%.17g).
  JsonWriter& Double(double value);

  // The text written so far.
  const std::string& str() const { return out_; }

 private:
  // Writes the comma that separates this value from the previous one, if any.
  void BeforeValue();

  std::string out_;
  // One entry per open container: true once it holds a value.
  std::vector<bool> has_value_;
  bool after_key_ = false;
};

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_JSON_WRITER_H_
