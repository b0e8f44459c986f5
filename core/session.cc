#include "core/session.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace sparsekv {

Session::Session(SessionInfo info, std::shared_ptr<MemoryBudget> budget)
    : budget_(std::move(budget)), info_(std::move(info)) {
  layers_.reserve(info_.layout.num_layers);
  for (int l = 0; l < info_.layout.num_layers; ++l) {
    layers_.emplace_back(info_.layout.num_kv_heads, info_.layout.head_dim, info_.layout.dtype);
  }
  last_access_ = info_.create_time;
}

Session::~Session() {
  MutexLock lock(&mu_);
  if (bytes_ > 0) budget_->Release(info_.tenant, bytes_);
}

void Session::Touch() { last_access_ = absl::Now(); }

absl::Status Session::CheckKvShape(const TensorView& t, const char* name,
                                   const std::vector<int64_t>& want) const {
  if (t.shape != want) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has shape ", ShapeString(t.shape), ", want ", ShapeString(want)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Session::Append(int layer_begin, const TensorView& k, const TensorView& v) {
  const Layout& l = info_.layout;
  if (k.shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("k must have shape [layers, tokens, num_kv_heads=", l.num_kv_heads,
                     ", head_dim=", l.head_dim, "], got ", ShapeString(k.shape)));
  }
  const int64_t layers = k.shape[0];
  const int64_t tokens = k.shape[1];
  if (layers < 1 || tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "k and v must hold at least one layer and one token, got ", ShapeString(k.shape)));
  }
  SPARSEKV_RETURN_IF_ERROR(CheckKvShape(k, "k", {layers, tokens, l.num_kv_heads, l.head_dim}));
  SPARSEKV_RETURN_IF_ERROR(CheckKvShape(v, "v", k.shape));
  if (layer_begin < 0 || layer_begin + layers > l.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layers [", layer_begin, ", ",
                                                   layer_begin + layers, ") outside the session's ",
                                                   l.num_layers, " layers"));
  }
  const int64_t add = layers * tokens * l.token_bytes();
  SPARSEKV_RETURN_IF_ERROR(budget_->Reserve(info_.tenant, add));
  const size_t src_layer_bytes =
      static_cast<size_t>(tokens) * l.num_kv_heads * l.head_dim * kernels::DTypeSize(k.dtype);
  MutexLock lock(&mu_);
  for (int64_t i = 0; i < layers; ++i) {
    layers_[layer_begin + i].Append(
        k.dtype, static_cast<const uint8_t*>(k.data) + i * src_layer_bytes,
        static_cast<const uint8_t*>(v.data) + i * src_layer_bytes, tokens);
  }
  bytes_ += add;
  Touch();
  return layers * tokens;
}

absl::Status Session::CheckDecode(const DecodeInput& in) const {
  const Layout& l = info_.layout;
  if (in.layer < 0 || in.layer >= l.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", in.layer, " outside the session's ", l.num_layers, " layers"));
  }
  if (in.q.shape != std::vector<int64_t>{l.num_q_heads, l.head_dim}) {
    return absl::InvalidArgumentError(absl::StrCat("q has shape ", ShapeString(in.q.shape),
                                                   ", want [num_q_heads=", l.num_q_heads,
                                                   ", head_dim=", l.head_dim, "]"));
  }
  if (in.new_k.empty() != in.new_v.empty()) {
    return absl::InvalidArgumentError("new_k and new_v must be given together or not at all");
  }
  if (!in.new_k.empty()) {
    const std::vector<int64_t> want = {l.num_kv_heads, l.head_dim};
    SPARSEKV_RETURN_IF_ERROR(CheckKvShape(in.new_k, "new_k", want));
    SPARSEKV_RETURN_IF_ERROR(CheckKvShape(in.new_v, "new_v", want));
  }
  if (!(in.scale >= 0.0f) || std::isinf(in.scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale must be finite and >= 0 (0 = 1/sqrt(head_dim)), got ", in.scale));
  }
  return absl::OkStatus();
}

absl::Status Session::Decode(const DecodeInput& in, const kernels::Backend& backend,
                             DecodeOutput* out) {
  SPARSEKV_RETURN_IF_ERROR(CheckDecode(in));
  const Layout& l = info_.layout;
  const bool append = !in.new_k.empty();
  if (append) SPARSEKV_RETURN_IF_ERROR(budget_->Reserve(info_.tenant, l.token_bytes()));

  // Queries in fp32, [num_q_heads, head_dim]; head h belongs to KV head h / group.
  std::vector<float> q(static_cast<size_t>(l.num_q_heads) * l.head_dim);
  kernels::ConvertElements(in.q.dtype, in.q.data, DType::kFloat32, q.data(), q.size());
  out->out.assign(q.size(), 0.0f);
  out->lse.assign(in.want_lse ? l.num_q_heads : 0, 0.0f);
  const int group = l.group_size();
  const float scale = in.scale > 0.0f ? in.scale : 1.0f / std::sqrt(static_cast<float>(l.head_dim));

  MutexLock lock(&mu_);
  DenseLayer& layer = layers_[in.layer];
  if (append) {
    layer.Append(in.new_k.dtype, in.new_k.data, in.new_v.data, 1);
    bytes_ += l.token_bytes();
  }
  for (int g = 0; g < l.num_kv_heads; ++g) {
    const kernels::DenseSpan span = layer.Span(g);
    kernels::DecodeAttentionParams p;
    p.q = q.data() + static_cast<size_t>(g) * group * l.head_dim;
    p.group = group;
    p.head_dim = l.head_dim;
    p.dtype = l.dtype;
    p.scale = scale;
    p.spans = &span;
    p.num_spans = 1;
    p.out = out->out.data() + static_cast<size_t>(g) * group * l.head_dim;
    p.lse = in.want_lse ? out->lse.data() + static_cast<size_t>(g) * group : nullptr;
    kernels::DecodeAttention(backend, p);
  }
  out->tokens_attended = layer.tokens();
  ++decode_steps_;
  Touch();
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Session::Read(int layer, int64_t token_begin, int64_t count,
                                      std::string* k_out, std::string* v_out) const {
  const Layout& l = info_.layout;
  if (layer < 0 || layer >= l.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " outside the session's ", l.num_layers, " layers"));
  }
  MutexLock lock(&mu_);
  const DenseLayer& d = layers_[layer];
  if (count < 0) count = d.tokens() - token_begin;
  if (token_begin < 0 || count < 0 || token_begin + count > d.tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("tokens [", token_begin, ", ",
                                                   token_begin + count, ") outside layer ", layer,
                                                   "'s ", d.tokens(), " tokens"));
  }
  d.Read(token_begin, count, k_out, v_out);
  return count;
}

SessionInfo Session::Info() const {
  MutexLock lock(&mu_);
  SessionInfo info = info_;
  info.last_access_time = last_access_;
  SessionStats& s = info.stats;
  s.tokens_per_layer.reserve(layers_.size());
  for (const DenseLayer& d : layers_) {
    s.tokens_per_layer.push_back(d.tokens());
    s.tokens_total += d.tokens();
    s.bytes_dense += d.bytes();
  }
  s.bytes_dense_equivalent = s.bytes_dense;
  s.decode_steps = decode_steps_;
  return info;
}

int64_t Session::tokens(int layer) const {
  MutexLock lock(&mu_);
  return layers_[layer].tokens();
}

int64_t Session::bytes() const {
  MutexLock lock(&mu_);
  return bytes_;
}

absl::Time Session::last_access() const {
  MutexLock lock(&mu_);
  return last_access_;
}

bool Session::expired(absl::Time now) const {
  return info_.ttl > absl::ZeroDuration() && now - last_access() > info_.ttl;
}

}  // namespace sparsekv
