#include "clients/cli/tensor_util.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dtype.h"

namespace sparsekv::cli {

size_t WireDTypeSize(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return 4;
    case v1::DTYPE_FLOAT16:
    case v1::DTYPE_BFLOAT16:
      return 2;
    default:
      return 0;
  }
}

const char* WireDTypeName(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return "float32";
    case v1::DTYPE_FLOAT16:
      return "float16";
    case v1::DTYPE_BFLOAT16:
      return "bfloat16";
    default:
      return "unspecified";
  }
}

absl::StatusOr<v1::DType> ParseWireDType(const std::string& name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n == "float32" || n == "fp32" || n == "f32") return v1::DTYPE_FLOAT32;
  if (n == "float16" || n == "fp16" || n == "f16" || n == "half") return v1::DTYPE_FLOAT16;
  if (n == "bfloat16" || n == "bf16") return v1::DTYPE_BFLOAT16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", name, "' (want float16, bfloat16 or float32)"));
}

const char* DecodeComputeName(v1::DecodeCompute compute) {
  switch (compute) {
    case v1::DECODE_COMPUTE_FLOAT32:
      return "f32";
    case v1::DECODE_COMPUTE_FLOAT16:
      return "f16";
    default:
      return "unspecified";
  }
}

absl::StatusOr<v1::DecodeCompute> ParseDecodeCompute(const std::string& name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n.empty()) return v1::DECODE_COMPUTE_UNSPECIFIED;
  if (n == "f32" || n == "float32" || n == "fp32") return v1::DECODE_COMPUTE_FLOAT32;
  if (n == "f16" || n == "float16" || n == "fp16") return v1::DECODE_COMPUTE_FLOAT16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown decode compute '", name, "' (want f32 or f16)"));
}

v1::Tensor NpyToTensor(const NpyArray& array) {
  v1::Tensor t;
  t.set_dtype(array.dtype == NpyDType::kFloat32 ? v1::DTYPE_FLOAT32 : v1::DTYPE_FLOAT16);
  for (int64_t d : array.shape) t.add_shape(d);
  t.set_data(array.data);
  return t;
}

int64_t TensorNumElements(const v1::Tensor& tensor) {
  int64_t n = 1;
  for (int64_t d : tensor.shape()) {
    if (d < 0) return -1;
    n *= d;
  }
  return n;
}

absl::StatusOr<std::vector<float>> TensorToFloats(const v1::Tensor& tensor) {
  const size_t size = WireDTypeSize(tensor.dtype());
  if (size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor has unsupported dtype ", static_cast<int>(tensor.dtype())));
  }
  const int64_t n = TensorNumElements(tensor);
  if (n < 0 || tensor.data().size() != static_cast<uint64_t>(n) * size) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor of shape [", absl::StrJoin(tensor.shape(), ", "), "] ",
                     WireDTypeName(tensor.dtype()), " carries ", tensor.data().size(), " bytes"));
  }
  const DType kd = tensor.dtype() == v1::DTYPE_FLOAT32   ? DType::kFloat32
                   : tensor.dtype() == v1::DTYPE_FLOAT16 ? DType::kFloat16
                                                         : DType::kBFloat16;
  // The wire bytes need not be aligned for float/uint16 access: copy them first.
  std::vector<float> out(static_cast<size_t>(n));
  if (kd == DType::kFloat32) {
    std::memcpy(out.data(), tensor.data().data(), tensor.data().size());
    return out;
  }
  std::vector<uint16_t> raw(static_cast<size_t>(n));
  std::memcpy(raw.data(), tensor.data().data(), tensor.data().size());
  for (size_t i = 0; i < raw.size(); ++i) out[i] = LoadAsFloat(kd, raw.data(), i);
  return out;
}

std::vector<AppendPiece> PlanAppendPieces(int64_t layers, int64_t tokens, int64_t row_bytes,
                                          int64_t max_payload_bytes) {
  std::vector<AppendPiece> pieces;
  if (tokens <= 0) return pieces;
  // K and V both travel in each message, hence the factor 2.
  const int64_t pair_bytes = 2 * row_bytes;
  const int64_t layers_per_piece =
      std::clamp<int64_t>(max_payload_bytes / std::max<int64_t>(pair_bytes, 1), 1, layers);
  for (int64_t l = 0; l < layers; l += layers_per_piece) {
    const int64_t lc = std::min(layers_per_piece, layers - l);
    const int64_t tokens_per_piece =
        std::clamp<int64_t>(max_payload_bytes / (lc * pair_bytes), 1, tokens);
    for (int64_t t = 0; t < tokens; t += tokens_per_piece) {
      pieces.push_back({l, lc, t, std::min(tokens_per_piece, tokens - t)});
    }
  }
  return pieces;
}

void SliceForAppend(const NpyArray& array, const AppendPiece& piece, v1::Tensor* out) {
  const int64_t tokens = array.shape[1];
  const size_t row =
      static_cast<size_t>(array.shape[2] * array.shape[3]) * NpyDTypeSize(array.dtype);
  out->set_dtype(array.dtype == NpyDType::kFloat32 ? v1::DTYPE_FLOAT32 : v1::DTYPE_FLOAT16);
  out->clear_shape();
  out->add_shape(piece.layer_count);
  out->add_shape(piece.tokens);
  out->add_shape(array.shape[2]);
  out->add_shape(array.shape[3]);
  std::string* data = out->mutable_data();
  data->clear();
  data->reserve(static_cast<size_t>(piece.layer_count * piece.tokens) * row);
  // Tokens of one layer are contiguous; layers are not (the piece covers part of each).
  for (int64_t l = piece.layer_begin; l < piece.layer_begin + piece.layer_count; ++l) {
    const size_t offset = static_cast<size_t>(l * tokens + piece.token_begin) * row;
    data->append(array.data, offset, static_cast<size_t>(piece.tokens) * row);
  }
}

}  // namespace sparsekv::cli
