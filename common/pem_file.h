// Reads a PEM file (TLS certificates and keys) for the server's and the CLI's TLS flags.
// Header-only; thread-safe.
#ifndef SPARSEKV_COMMON_PEM_FILE_H_
#define SPARSEKV_COMMON_PEM_FILE_H_

#include <fstream>
#include <iterator>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace sparsekv {

// The file's text. InvalidArgument naming `flag` (e.g. "--tls_cert_file") when it cannot be
// read or holds no PEM block.
inline absl::StatusOr<std::string> ReadPemFile(const std::string& path, const char* flag) {
  std::ifstream f(path, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (!f.is_open() || text.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, "=", path, ": not a readable PEM file"));
  }
  return text;
}

}  // namespace sparsekv

#endif  // SPARSEKV_COMMON_PEM_FILE_H_
