#include "service/convert.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace sparsekv::service {

absl::StatusOr<DType> FromProto(v1::DType d, const char* field) {
  switch (d) {
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".dtype must be DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16, got ",
          d == v1::DTYPE_UNSPECIFIED ? std::string("DTYPE_UNSPECIFIED")
                                     : absl::StrCat("enum value ", static_cast<int>(d))));
  }
}

v1::DType ToProto(DType d) {
  switch (d) {
    case DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    case DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<TensorView> ViewTensor(const v1::Tensor& t, const char* field) {
  TensorView v;
  SPARSEKV_ASSIGN_OR_RETURN(v.dtype, FromProto(t.dtype(), absl::StrCat(field, ".dtype").c_str()));
  if (t.shape_size() == 0 || t.shape_size() > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".shape must have 1..8 dimensions, got ", t.shape_size()));
  }
  uint64_t n = 1;
  for (int64_t d : t.shape()) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " is empty or malformed: shape ",
                       ShapeString({t.shape().begin(), t.shape().end()}), " has a dimension <= 0"));
    }
    if (d > (int64_t{1} << 40) || n > (uint64_t{1} << 40) / static_cast<uint64_t>(d)) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape is too large"));
    }
    n *= static_cast<uint64_t>(d);
  }
  v.shape.assign(t.shape().begin(), t.shape().end());
  const uint64_t want = n * DTypeSize(v.dtype);
  if (t.data().size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".data has ", t.data().size(),
                                                   " bytes, but shape ", ShapeString(v.shape),
                                                   " of ", DTypeName(v.dtype), " needs ", want));
  }
  v.data = t.data().data();
  return v;
}

absl::StatusOr<TensorView> ViewOptionalTensor(const v1::Tensor& t, const char* field) {
  if (t.dtype() == v1::DTYPE_UNSPECIFIED && t.shape_size() == 0 && t.data().empty()) {
    return TensorView{};
  }
  return ViewTensor(t, field);
}

namespace {

PruneDirection FromProto(v1::PruneDirection d) {
  return d == v1::PRUNE_DIRECTION_PER_CHANNEL ? PruneDirection::kPerChannel
                                              : PruneDirection::kPerToken;
}

// Unspecified scoring means output-aware: on docs-byte-10m (head_dim 64) per-token K+V
// output-aware cost +0.77% / +5.02% perplexity at 50% / 70% against +1.21% / +5.73% for
// magnitude (tests/eval/frontend_quality_results.md).
Scoring FromProto(v1::Scoring s) {
  return s == v1::SCORING_MAGNITUDE ? Scoring::kMagnitude : Scoring::kOutputAware;
}

v1::PruneDirection ToProto(PruneDirection d) {
  return d == PruneDirection::kPerChannel ? v1::PRUNE_DIRECTION_PER_CHANNEL
                                          : v1::PRUNE_DIRECTION_PER_TOKEN;
}

v1::Scoring ToProto(Scoring s) {
  return s == Scoring::kOutputAware ? v1::SCORING_OUTPUT_AWARE : v1::SCORING_MAGNITUDE;
}

// Unspecified means fp32: the exact path stays the default, fp16 arithmetic is opt-in.
DecodeCompute FromProto(v1::DecodeCompute c) {
  return c == v1::DECODE_COMPUTE_FLOAT16 ? DecodeCompute::kFloat16 : DecodeCompute::kFloat32;
}

v1::DecodeCompute ToProto(DecodeCompute c) {
  return c == DecodeCompute::kFloat16 ? v1::DECODE_COMPUTE_FLOAT16 : v1::DECODE_COMPUTE_FLOAT32;
}

absl::StatusOr<TensorPolicy> FromProto(const v1::TensorPolicy& p, const char* field) {
  if (!v1::PruneDirection_IsValid(p.direction())) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".direction: unknown enum value ", static_cast<int>(p.direction())));
  }
  if (!v1::Scoring_IsValid(p.scoring())) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".scoring: unknown enum value ", static_cast<int>(p.scoring())));
  }
  TensorPolicy out;
  out.sparsity = p.sparsity();
  out.layer_sparsity.assign(p.layer_sparsity().begin(), p.layer_sparsity().end());
  out.direction = FromProto(p.direction());
  out.scoring = FromProto(p.scoring());
  return out;
}

void ToProto(const TensorPolicy& p, v1::TensorPolicy* out) {
  out->set_sparsity(p.sparsity);
  for (float s : p.layer_sparsity) out->add_layer_sparsity(s);
  out->set_direction(ToProto(p.direction));
  out->set_scoring(ToProto(p.scoring));
}

// Proto uint32 fields land in int: values beyond INT32_MAX are out of range anyway.
int ClampToInt(uint32_t v) { return v > 0x7fffffffu ? 0x7fffffff : static_cast<int>(v); }

}  // namespace

absl::StatusOr<CreateSessionParams> FromProto(const v1::CreateSessionRequest& req) {
  CreateSessionParams p;
  p.id = req.session_id();
  p.tenant = req.tenant();
  const v1::Layout& l = req.layout();
  p.layout.num_layers = ClampToInt(l.num_layers());
  p.layout.num_kv_heads = ClampToInt(l.num_kv_heads());
  p.layout.num_q_heads = ClampToInt(l.num_q_heads());
  p.layout.head_dim = ClampToInt(l.head_dim());
  if (l.dtype() == v1::DTYPE_UNSPECIFIED) {
    p.layout.dtype = DType::kFloat16;
  } else {
    SPARSEKV_ASSIGN_OR_RETURN(p.layout.dtype, FromProto(l.dtype(), "layout.dtype"));
  }
  const v1::Policy& pol = req.policy();
  SPARSEKV_ASSIGN_OR_RETURN(p.policy.k, FromProto(pol.k(), "policy.k"));
  SPARSEKV_ASSIGN_OR_RETURN(p.policy.v, FromProto(pol.v(), "policy.v"));
  if (pol.dense_window() != 0) p.policy.dense_window = ClampToInt(pol.dense_window());
  if (pol.group_tokens() != 0) p.policy.group_tokens = ClampToInt(pol.group_tokens());
  if (pol.chunk_tokens() != 0) p.policy.chunk_tokens = ClampToInt(pol.chunk_tokens());
  if (!v1::DecodeCompute_IsValid(pol.decode_compute())) {
    return absl::InvalidArgumentError(absl::StrCat("policy.decode_compute: unknown enum value ",
                                                   static_cast<int>(pol.decode_compute())));
  }
  p.policy.decode_compute = FromProto(pol.decode_compute());
  if (req.ttl_seconds() > 10ull * 365 * 24 * 3600) {
    return absl::InvalidArgumentError(absl::StrCat("ttl_seconds too large: ", req.ttl_seconds()));
  }
  p.ttl = absl::Seconds(static_cast<int64_t>(req.ttl_seconds()));
  p.labels.insert(req.labels().begin(), req.labels().end());
  return p;
}

absl::StatusOr<DecodeInput> FromProto(const v1::DecodeItem& item, const char* field) {
  DecodeInput in;
  if (item.session_id().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".session_id is required"));
  }
  in.session_id = item.session_id();
  in.layer = ClampToInt(item.layer());
  SPARSEKV_ASSIGN_OR_RETURN(in.q, ViewTensor(item.q(), "q"));
  SPARSEKV_ASSIGN_OR_RETURN(in.new_k, ViewOptionalTensor(item.new_k(), "new_k"));
  SPARSEKV_ASSIGN_OR_RETURN(in.new_v, ViewOptionalTensor(item.new_v(), "new_v"));
  in.want_lse = item.want_lse();
  in.scale = item.scale();
  return in;
}

void ToProto(const SessionStats& s, v1::SessionStats* out) {
  for (int64_t t : s.tokens_per_layer) out->add_tokens_per_layer(static_cast<uint64_t>(t));
  out->set_tokens_total(s.tokens_total);
  out->set_bytes_dense(s.bytes_dense);
  out->set_bytes_compressed(s.bytes_compressed);
  out->set_bytes_dense_equivalent(s.bytes_dense_equivalent);
  out->set_achieved_sparsity_k(s.achieved_sparsity_k);
  out->set_achieved_sparsity_v(s.achieved_sparsity_v);
  out->set_scoring_in_force_k(ToProto(s.scoring_in_force_k));
  out->set_scoring_in_force_v(ToProto(s.scoring_in_force_v));
  out->set_pruning_backlog_tokens(s.pruning_backlog_tokens);
  out->set_decode_steps(s.decode_steps);
  out->set_chunks(s.chunks);
  out->set_chunks_output_aware_k(s.chunks_output_aware_k);
  out->set_chunks_output_aware_v(s.chunks_output_aware_v);
  out->set_decode_compute_in_force(ToProto(s.decode_compute_in_force));
  out->set_bytes_accounted(static_cast<uint64_t>(s.bytes_accounted));
}

void ToProto(const SessionInfo& info, v1::Session* out) {
  out->set_id(info.id);
  out->set_tenant(info.tenant);
  v1::Layout* l = out->mutable_layout();
  l->set_num_layers(info.layout.num_layers);
  l->set_num_kv_heads(info.layout.num_kv_heads);
  l->set_num_q_heads(info.layout.num_q_heads);
  l->set_head_dim(info.layout.head_dim);
  l->set_dtype(ToProto(info.layout.dtype));
  v1::Policy* p = out->mutable_policy();
  ToProto(info.policy.k, p->mutable_k());
  ToProto(info.policy.v, p->mutable_v());
  p->set_dense_window(info.policy.dense_window);
  p->set_chunk_tokens(info.policy.chunk_tokens);
  p->set_group_tokens(info.policy.group_tokens);
  p->set_decode_compute(ToProto(info.policy.decode_compute));
  out->set_ttl_seconds(absl::ToInt64Seconds(info.ttl));
  out->mutable_labels()->insert(info.labels.begin(), info.labels.end());
  out->set_create_time_unix_ms(absl::ToUnixMillis(info.create_time));
  out->set_last_access_time_unix_ms(absl::ToUnixMillis(info.last_access_time));
  ToProto(info.stats, out->mutable_stats());
}

void FloatsToTensor(const std::vector<float>& values, std::vector<int64_t> shape, DType dtype,
                    v1::Tensor* out) {
  out->set_dtype(ToProto(dtype));
  for (int64_t d : shape) out->add_shape(d);
  std::string* data = out->mutable_data();
  data->resize(values.size() * DTypeSize(dtype));
  ConvertScalar(DType::kFloat32, values.data(), dtype, data->data(), values.size());
}

}  // namespace sparsekv::service
