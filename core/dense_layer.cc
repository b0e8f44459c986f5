#include "core/dense_layer.h"

#include <cstring>

namespace sparsekv {

DenseLayer::DenseLayer(int num_kv_heads, int head_dim, kernels::DType dtype)
    : num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      dtype_(dtype),
      row_bytes_(static_cast<size_t>(head_dim) * kernels::DTypeSize(dtype)),
      k_(num_kv_heads),
      v_(num_kv_heads) {}

int64_t DenseLayer::bytes() const {
  return 2 * tokens_ * num_kv_heads_ * static_cast<int64_t>(row_bytes_);
}

void DenseLayer::Append(kernels::DType src_dtype, const void* k, const void* v, int64_t tokens) {
  const size_t src_row = static_cast<size_t>(head_dim_) * kernels::DTypeSize(src_dtype);
  const auto* ks = static_cast<const uint8_t*>(k);
  const auto* vs = static_cast<const uint8_t*>(v);
  for (int h = 0; h < num_kv_heads_; ++h) {
    const size_t old = k_[h].size();
    k_[h].resize(old + tokens * row_bytes_);
    v_[h].resize(old + tokens * row_bytes_);
    for (int64_t t = 0; t < tokens; ++t) {
      const size_t src = (static_cast<size_t>(t) * num_kv_heads_ + h) * src_row;
      const size_t dst = old + t * row_bytes_;
      kernels::ConvertElements(src_dtype, ks + src, dtype_, k_[h].data() + dst, head_dim_);
      kernels::ConvertElements(src_dtype, vs + src, dtype_, v_[h].data() + dst, head_dim_);
    }
  }
  tokens_ += tokens;
}

kernels::DenseSpan DenseLayer::Span(int head) const {
  return kernels::DenseSpan{k_[head].data(), v_[head].data(), tokens_};
}

void DenseLayer::Read(int64_t begin, int64_t count, std::string* k_out, std::string* v_out) const {
  const size_t old = k_out->size();
  const size_t add = static_cast<size_t>(count) * num_kv_heads_ * row_bytes_;
  k_out->resize(old + add);
  v_out->resize(v_out->size() + add);
  char* kd = k_out->data() + old;
  char* vd = v_out->data() + v_out->size() - add;
  for (int64_t t = 0; t < count; ++t) {
    for (int h = 0; h < num_kv_heads_; ++h) {
      const size_t src = static_cast<size_t>(begin + t) * row_bytes_;
      const size_t dst = (static_cast<size_t>(t) * num_kv_heads_ + h) * row_bytes_;
      std::memcpy(kd + dst, k_[h].data() + src, row_bytes_);
      std::memcpy(vd + dst, v_[h].data() + src, row_bytes_);
    }
  }
}

}  // namespace sparsekv
