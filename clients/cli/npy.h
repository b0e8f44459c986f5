// Reading and writing NumPy .npy files of float32 and float16 arrays.
//
// The CLI moves tensors between files and the service in this format because every ML stack
// writes it (`np.save`). Supported: format versions 1.0, 2.0 and 3.0, little-endian `<f4` and
// `<f2`, C (row-major) order. Anything else (fortran_order, big-endian, other dtypes) is
// rejected with a message that says what was found and what is accepted; the data is never
// reinterpreted silently.
#ifndef SPARSEKV_CLIENTS_CLI_NPY_H_
#define SPARSEKV_CLIENTS_CLI_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sparsekv::cli {

enum class NpyDType {
  kFloat32,  // "<f4"
  kFloat16,  // "<f2", IEEE binary16
};

// Bytes per element of `dtype`.
size_t NpyDTypeSize(NpyDType dtype);
// "<f4" or "<f2".
const char* NpyDTypeDescr(NpyDType dtype);

// An n-dimensional array: shape outermost first, `data` holds product(shape) elements of
// `dtype`, row-major, little-endian. A zero-dimensional array (shape empty) holds one element.
struct NpyArray {
  NpyDType dtype = NpyDType::kFloat32;
  std::vector<int64_t> shape;
  std::string data;

  // product(shape).
  int64_t NumElements() const;
};

// Parses the contents of a .npy file. Returns InvalidArgument naming the problem for a bad
// magic string, unsupported version, malformed header, fortran_order, an unsupported dtype,
// or a data section whose size does not match the shape.
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes);

// Serialises `array` as a version 1.0 .npy file (2.0 when the header would not fit 1.0),
// header padded to a multiple of 64 bytes as NumPy does. Returns InvalidArgument when
// data.size() does not match the shape.
absl::StatusOr<std::string> SerializeNpy(const NpyArray& array);

// Reads and parses `path`. File errors come back as InvalidArgument with the path (the CLI
// treats an unreadable input file as a usage error); parse errors are prefixed with the path.
absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path);

// Serialises `array` and writes it to `path`, replacing the file. Returns InvalidArgument for
// a bad array and Internal (with the path and errno text) when the file cannot be written.
absl::Status WriteNpyFile(const std::string& path, const NpyArray& array);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_NPY_H_
