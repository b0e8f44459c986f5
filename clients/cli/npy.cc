#include "clients/cli/npy.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

namespace sparsekv::cli {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

// A cursor over the header dictionary, a Python literal such as
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  void SkipSpace() {
    while (pos_ < text_.size() && absl::ascii_isspace(static_cast<unsigned char>(text_[pos_]))) {
      ++pos_;
    }
  }

  bool Consume(char c) {
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  bool Peek(char c) {
    SkipSpace();
    return pos_ < text_.size() && text_[pos_] == c;
  }

  // A quoted Python string without escapes (NumPy never writes any in a header).
  bool String(std::string* out) {
    SkipSpace();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) return false;
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == absl::string_view::npos) return false;
    *out = std::string(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return true;
  }

  // An identifier such as True or False.
  bool Word(std::string* out) {
    SkipSpace();
    const size_t start = pos_;
    while (pos_ < text_.size() && absl::ascii_isalpha(static_cast<unsigned char>(text_[pos_]))) {
      ++pos_;
    }
    *out = std::string(text_.substr(start, pos_ - start));
    return !out->empty();
  }

  // A tuple of non-negative integers: (), (3,), (2, 3). NumPy writes Python ints, which may
  // carry an 'L' suffix in files from Python 2.
  bool Shape(std::vector<int64_t>* shape) {
    if (!Consume('(')) return false;
    shape->clear();
    while (!Consume(')')) {
      SkipSpace();
      const size_t start = pos_;
      while (pos_ < text_.size() && absl::ascii_isdigit(static_cast<unsigned char>(text_[pos_]))) {
        ++pos_;
      }
      int64_t dim;
      if (!absl::SimpleAtoi(text_.substr(start, pos_ - start), &dim)) return false;
      shape->push_back(dim);
      if (pos_ < text_.size() && text_[pos_] == 'L') ++pos_;
      if (!Consume(',') && !Peek(')')) return false;
    }
    return true;
  }

  bool AtEnd() {
    SkipSpace();
    return pos_ == text_.size();
  }

 private:
  absl::string_view text_;
  size_t pos_ = 0;
};

absl::Status HeaderError(absl::string_view what, absl::string_view header) {
  return absl::InvalidArgumentError(absl::StrCat("malformed .npy header (", what, "): ", header));
}

}  // namespace

size_t NpyDTypeSize(NpyDType dtype) { return dtype == NpyDType::kFloat32 ? 4 : 2; }

const char* NpyDTypeDescr(NpyDType dtype) { return dtype == NpyDType::kFloat32 ? "<f4" : "<f2"; }

int64_t NpyArray::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes) {
  if (bytes.size() < kMagicSize + 2 || bytes.substr(0, kMagicSize) != kMagic) {
    return absl::InvalidArgumentError("not a .npy file (missing \\x93NUMPY magic)");
  }
  const uint8_t major = static_cast<uint8_t>(bytes[6]);
  const uint8_t minor = static_cast<uint8_t>(bytes[7]);
  size_t header_len_size;
  if (major == 1 && minor == 0) {
    header_len_size = 2;
  } else if ((major == 2 || major == 3) && minor == 0) {
    // 3.0 differs from 2.0 only in allowing UTF-8 in the header, which we never need.
    header_len_size = 4;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy format version ", major, ".",
                                                   minor, " (supported: 1.0, 2.0, 3.0)"));
  }
  const size_t prefix = kMagicSize + 2 + header_len_size;
  if (bytes.size() < prefix) return absl::InvalidArgumentError("truncated .npy header");
  uint64_t header_len = 0;
  for (size_t i = 0; i < header_len_size; ++i) {
    header_len |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[8 + i])) << (8 * i);
  }
  if (bytes.size() - prefix < header_len) {
    return absl::InvalidArgumentError("truncated .npy header");
  }
  const absl::string_view header = bytes.substr(prefix, header_len);

  std::string descr;
  bool have_descr = false, have_order = false, have_shape = false;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  HeaderParser p(header);
  if (!p.Consume('{')) return HeaderError("expected '{'", header);
  while (!p.Consume('}')) {
    std::string key;
    if (!p.String(&key)) return HeaderError("expected a quoted key", header);
    if (!p.Consume(':')) return HeaderError("expected ':'", header);
    if (key == "descr") {
      if (!p.String(&descr)) {
        // Structured dtypes have a list here.
        return absl::InvalidArgumentError(
            "unsupported .npy dtype: structured arrays are not supported (want <f4 or <f2)");
      }
      have_descr = true;
    } else if (key == "fortran_order") {
      std::string word;
      if (!p.Word(&word) || (word != "True" && word != "False")) {
        return HeaderError("fortran_order must be True or False", header);
      }
      fortran_order = word == "True";
      have_order = true;
    } else if (key == "shape") {
      if (!p.Shape(&shape)) return HeaderError("bad shape tuple", header);
      have_shape = true;
    } else {
      return HeaderError(absl::StrCat("unknown key '", key, "'"), header);
    }
    if (!p.Consume(',') && !p.Peek('}')) return HeaderError("expected ',' or '}'", header);
  }
  if (!have_descr || !have_order || !have_shape) {
    return HeaderError("needs descr, fortran_order and shape", header);
  }

  NpyArray array;
  if (descr == "<f4") {
    array.dtype = NpyDType::kFloat32;
  } else if (descr == "<f2") {
    array.dtype = NpyDType::kFloat16;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported .npy dtype '", descr,
        "': want little-endian float32 '<f4' or float16 '<f2' (numpy: a.astype('<f4'))"));
  }
  if (fortran_order) {
    return absl::InvalidArgumentError(
        "unsupported .npy layout: fortran_order is True; save a C-ordered array "
        "(numpy: np.ascontiguousarray(a))");
  }
  // Bound the element count so that the size computation below cannot overflow.
  uint64_t elements = 1;
  for (int64_t d : shape) {
    if (d < 0) return HeaderError("negative dimension", header);
    if (d != 0 && elements > std::numeric_limits<uint64_t>::max() / 8 / static_cast<uint64_t>(d)) {
      return HeaderError("shape too large", header);
    }
    elements *= static_cast<uint64_t>(d);
  }
  array.shape = std::move(shape);
  const absl::string_view data = bytes.substr(prefix + header_len);
  const uint64_t want = elements * NpyDTypeSize(array.dtype);
  if (data.size() != want) {
    return absl::InvalidArgumentError(
        absl::StrCat(".npy data size mismatch: shape (", absl::StrJoin(array.shape, ", "), ") of ",
                     descr, " needs ", want, " bytes, file has ", data.size()));
  }
  array.data = std::string(data);
  return array;
}

absl::StatusOr<std::string> SerializeNpy(const NpyArray& array) {
  for (int64_t d : array.shape) {
    if (d < 0) return absl::InvalidArgumentError("negative dimension in .npy shape");
  }
  const uint64_t want = static_cast<uint64_t>(array.NumElements()) * NpyDTypeSize(array.dtype);
  if (array.data.size() != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("array data holds ", array.data.size(), " bytes, shape needs ", want));
  }
  std::string shape = absl::StrJoin(array.shape, ", ");
  if (array.shape.size() == 1) shape += ",";  // Python's one-element tuple
  std::string header = absl::StrCat("{'descr': '", NpyDTypeDescr(array.dtype),
                                    "', 'fortran_order': False, 'shape': (", shape, "), }");
  // Pad with spaces and a final newline so that the data starts 64-byte aligned.
  auto padded = [&header](size_t prefix) {
    const size_t unpadded = prefix + header.size() + 1;
    return header + std::string((64 - unpadded % 64) % 64, ' ') + "\n";
  };
  std::string out(kMagic, kMagicSize);
  std::string h = padded(kMagicSize + 2 + 2);
  if (h.size() <= 0xffff) {
    out.push_back(1);
    out.push_back(0);
    out.push_back(static_cast<char>(h.size() & 0xff));
    out.push_back(static_cast<char>(h.size() >> 8));
  } else {
    h = padded(kMagicSize + 2 + 4);
    out.push_back(2);
    out.push_back(0);
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((h.size() >> (8 * i)) & 0xff));
  }
  out += h;
  out += array.data;
  return out;
}

absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  std::string bytes;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) bytes.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return absl::InvalidArgumentError(absl::StrCat("cannot read ", path));
  absl::StatusOr<NpyArray> array = ParseNpy(bytes);
  if (!array.ok()) {
    return absl::Status(array.status().code(), absl::StrCat(path, ": ", array.status().message()));
  }
  return array;
}

absl::Status WriteNpyFile(const std::string& path, const NpyArray& array) {
  absl::StatusOr<std::string> bytes = SerializeNpy(array);
  if (!bytes.ok()) return bytes.status();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  }
  const bool wrote = std::fwrite(bytes->data(), 1, bytes->size(), f) == bytes->size();
  const bool closed = std::fclose(f) == 0;
  if (!wrote || !closed) {
    return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace sparsekv::cli
