// Conversions between .npy arrays, wire Tensors and float vectors, names of wire enums, and
// the splitting of a K/V upload into AppendKV messages.
//
// Kept apart from the command code so that the byte-level work (dtype conversion, slicing
// along tokens) is unit-tested without a server.
#ifndef SPARSEKV_CLIENTS_CLI_TENSOR_UTIL_H_
#define SPARSEKV_CLIENTS_CLI_TENSOR_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "clients/cli/npy.h"
#include "sparsekv/v1/kv_cache.pb.h"

namespace sparsekv::cli {

// Bytes per element of a wire dtype; 0 for DTYPE_UNSPECIFIED or unknown values.
size_t WireDTypeSize(v1::DType dtype);

// "float32", "float16", "bfloat16" or "unspecified".
const char* WireDTypeName(v1::DType dtype);

// Parses "float16" | "bfloat16" | "float32" (also "fp16", "bf16", "fp32", "f16", "f32").
// Returns InvalidArgument for anything else.
absl::StatusOr<v1::DType> ParseWireDType(const std::string& name);

// "f32", "f16" or "unspecified": the spelling --decode_compute takes.
const char* DecodeComputeName(v1::DecodeCompute compute);

// Parses "f32" | "f16" (also "float32", "fp32", "float16", "fp16"); "" gives UNSPECIFIED (the
// server default, f32). Returns InvalidArgument for anything else.
absl::StatusOr<v1::DecodeCompute> ParseDecodeCompute(const std::string& name);

// The wire Tensor holding `array` unchanged (same bytes, dtype and shape).
v1::Tensor NpyToTensor(const NpyArray& array);

// The elements of `tensor` converted to float, row-major. Returns InvalidArgument when the
// dtype is unspecified or data.size() != product(shape) * sizeof(dtype).
absl::StatusOr<std::vector<float>> TensorToFloats(const v1::Tensor& tensor);

// Elements per tensor, product(shape); -1 if a dimension is negative.
int64_t TensorNumElements(const v1::Tensor& tensor);

// One AppendKV message's part of an upload: layers [layer_begin, layer_begin + layer_count)
// of the upload (relative to its first layer), tokens [token_begin, token_begin + tokens).
struct AppendPiece {
  int64_t layer_begin = 0;
  int64_t layer_count = 0;
  int64_t token_begin = 0;
  int64_t tokens = 0;
};

// Splits an upload of [layers, tokens, ...] K and V, whose token rows (one token of one layer,
// all KV heads) take `row_bytes` each, into pieces whose K plus V payload is at most
// `max_payload_bytes`. All layers travel together when one token of every layer fits;
// otherwise layers are split too. A single row larger than the budget still gets a piece of
// its own (the server then decides). Pieces are ordered by layer group, then token. An upload
// with zero tokens gives no pieces. REQUIRES: layers >= 1, tokens >= 0, row_bytes >= 1.
std::vector<AppendPiece> PlanAppendPieces(int64_t layers, int64_t tokens, int64_t row_bytes,
                                          int64_t max_payload_bytes);

// Copies `piece` of `array` ([layers, tokens, heads, head_dim], C order) into `out` with
// shape [piece.layer_count, piece.tokens, heads, head_dim] and the array's dtype.
// REQUIRES: array has 4 dimensions and the piece lies inside it.
void SliceForAppend(const NpyArray& array, const AppendPiece& piece, v1::Tensor* out);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_TENSOR_UTIL_H_
