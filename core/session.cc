#include "core/session.h"

#include <cmath>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/attend.h"
#include "core/compressor.h"
#include "core/status_macros.h"

namespace sparsekv {

Session::Session(SessionInfo info, SessionEnv env) : env_(std::move(env)), info_(std::move(info)) {
  layers_.reserve(info_.layout.num_layers);
  for (int l = 0; l < info_.layout.num_layers; ++l) layers_.emplace_back(info_.layout);
  last_access_ = info_.create_time;
}

Session::~Session() { Close(); }

int64_t Session::Close() {
  MutexLock lock(&mu_);
  if (closed_) return 0;
  closed_ = true;
  if (bytes_ > 0) env_.budget->Release(info_.tenant, bytes_);
  return bytes_;
}

void Session::ChargeLocked(int64_t delta) {
  bytes_ += delta;
  if (closed_) env_.budget->Release(info_.tenant, delta);
}

void Session::Touch() { last_access_ = absl::Now(); }

float Session::Scale(float requested) const {
  return requested > 0.0f ? requested : 1.0f / std::sqrt(static_cast<float>(info_.layout.head_dim));
}

bool Session::NeedsMass() const {
  auto needs = [](const TensorPolicy& p) {
    return p.AnySparse() && p.scoring == Scoring::kOutputAware &&
           p.direction == PruneDirection::kPerChannel;
  };
  return needs(info_.policy.k) || needs(info_.policy.v);
}

absl::Status Session::CheckKvShape(const TensorView& t, const char* name,
                                   const std::vector<int64_t>& want) const {
  if (t.shape != want) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has shape ", ShapeString(t.shape), ", want ", ShapeString(want)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Session::Append(int layer_begin, const TensorView& k, const TensorView& v,
                                        const TensorView& obs_q) {
  const Layout& l = info_.layout;
  if (k.shape.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("k must have shape [layers, tokens, num_kv_heads=", l.num_kv_heads,
                     ", head_dim=", l.head_dim, "], got ", ShapeString(k.shape)));
  }
  const int64_t layers = k.shape[0];
  const int64_t tokens = k.shape[1];
  SPARSEKV_RETURN_IF_ERROR(CheckKvShape(k, "k", {layers, tokens, l.num_kv_heads, l.head_dim}));
  SPARSEKV_RETURN_IF_ERROR(CheckKvShape(v, "v", k.shape));
  if (layer_begin < 0 || layer_begin + layers > l.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layers [", layer_begin, ", ",
                                                   layer_begin + layers, ") outside the session's ",
                                                   l.num_layers, " layers"));
  }
  int64_t obs_tokens = 0;
  if (!obs_q.empty()) {
    if (obs_q.shape.size() != 4 || obs_q.shape[0] != layers || obs_q.shape[2] != l.num_q_heads ||
        obs_q.shape[3] != l.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "obs_q has shape ", ShapeString(obs_q.shape), ", want [layers=", layers,
          ", obs_tokens, num_q_heads=", l.num_q_heads, ", head_dim=", l.head_dim, "]"));
    }
    obs_tokens = obs_q.shape[1];
  }
  const int64_t add = layers * tokens * l.token_bytes();
  SPARSEKV_RETURN_IF_ERROR(env_.budget->Reserve(info_.tenant, add));
  const size_t es = kernels::DTypeSize(k.dtype);
  const size_t head_stride = static_cast<size_t>(l.head_dim) * es;
  const size_t token_stride = head_stride * l.num_kv_heads;
  const size_t layer_stride = token_stride * tokens;
  const size_t q_elems = static_cast<size_t>(l.num_q_heads) * l.head_dim;
  std::vector<float> q(q_elems), out(q_elems), lse(l.num_q_heads), mass;
  const float scale = Scale(0.0f);
  for (int64_t i = 0; i < layers; ++i) {
    const int layer = layer_begin + static_cast<int>(i);
    LayerSnapshot snap;
    {
      MutexLock lock(&mu_);
      layers_[layer].Append(k.dtype, static_cast<const uint8_t*>(k.data) + i * layer_stride,
                            static_cast<const uint8_t*>(v.data) + i * layer_stride, tokens,
                            token_stride, head_stride);
      ChargeLocked(tokens * l.token_bytes());
      Touch();
      if (obs_tokens == 0) {
        MaybeSchedule(layer);
        continue;
      }
      snap = layers_[layer].Snapshot();
    }
    // Seed the scoring statistics before the new tokens become eligible for compression.
    // These steps only feed statistics: they run fp32 whatever the policy's decode_compute.
    for (int64_t t = 0; t < obs_tokens; ++t) {
      kernels::ConvertElements(
          obs_q.dtype,
          static_cast<const uint8_t*>(obs_q.data) +
              ((i * obs_tokens + t) * q_elems) * kernels::DTypeSize(obs_q.dtype),
          DType::kFloat32, q.data(), q_elems);
      AttendLayer(l, snap, q.data(), *env_.backend, AttendOptions{scale}, out.data(), lse.data());
      RecordScoring(layer, snap, q.data(), scale, lse.data());
    }
    MutexLock lock(&mu_);
    MaybeSchedule(layer);
  }
  return layers * tokens;
}

void Session::RecordScoring(int layer, const LayerSnapshot& snap, const float* q, float scale,
                            const float* lse) {
  std::vector<float> mass;
  const bool need_mass = NeedsMass();
  if (need_mass) TailMass(info_.layout, snap, q, scale, lse, &mass);
  MutexLock lock(&mu_);
  LayerStore& store = layers_[layer];
  store.AddQueryEnergy(q);
  if (!need_mass) return;
  for (int h = 0; h < info_.layout.num_kv_heads; ++h) {
    store.AddMass(snap, h, mass.data() + static_cast<size_t>(h) * snap.tail_tokens);
  }
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

absl::Status Session::Decode(const DecodeInput& in, DecodeOutput* out) {
  SPARSEKV_RETURN_IF_ERROR(CheckDecode(in));
  const Layout& l = info_.layout;
  const bool append = !in.new_k.empty();
  if (append) SPARSEKV_RETURN_IF_ERROR(env_.budget->Reserve(info_.tenant, l.token_bytes()));

  std::vector<float> q(static_cast<size_t>(l.num_q_heads) * l.head_dim);
  kernels::ConvertElements(in.q.dtype, in.q.data, DType::kFloat32, q.data(), q.size());
  out->out.assign(q.size(), 0.0f);
  std::vector<float> lse(l.num_q_heads);
  const float scale = Scale(in.scale);

  LayerSnapshot snap;
  {
    MutexLock lock(&mu_);
    LayerStore& layer = layers_[in.layer];
    if (append) {
      const size_t head_stride =
          static_cast<size_t>(l.head_dim) * kernels::DTypeSize(in.new_k.dtype);
      layer.Append(in.new_k.dtype, static_cast<const uint8_t*>(in.new_k.data),
                   static_cast<const uint8_t*>(in.new_v.data), 1, 0, head_stride);
      ChargeLocked(l.token_bytes());
      MaybeSchedule(in.layer);
    }
    snap = layer.Snapshot();
    ++decode_steps_;
    Touch();
  }
  AttendOptions options;
  options.scale = scale;
  options.compute = info_.policy.decode_compute;
  options.pool = env_.threads.get();
  AttendLayer(l, snap, q.data(), *env_.backend, options, out->out.data(), lse.data());
  // With kFloat16 this lse carries the step's ~1e-3 error into the fp32 tail mass, as a
  // factor per query head that changes from step to step: per-channel output-aware ranking
  // may break near-ties differently (tests/eval/attention_quality.py, fp16 store, 70%: up to
  // 0.5% of keep/drop decisions differ, error vs dense within 1%). An fp32 lse would cost the
  // full fp32 step that kFloat16 saves.
  RecordScoring(in.layer, snap, q.data(), scale, lse.data());
  if (in.want_lse) out->lse = std::move(lse);
  out->tokens_attended = snap.tokens;
  return absl::OkStatus();
}

void Session::MaybeSchedule(int layer) {
  LayerStore& s = layers_[layer];
  const Policy& p = info_.policy;
  if (s.job_queued || s.compressing || s.tail_tokens() < p.dense_window + p.chunk_tokens) return;
  s.job_queued = true;
  std::weak_ptr<Session> weak = weak_from_this();
  if (!env_.pruner->TrySchedule([weak, layer] {
        if (std::shared_ptr<Session> self = weak.lock()) self->CompressJob(layer);
      })) {
    // Queue full: the layer stays eligible and the next append tries again; the backlog
    // shows in stats.
    s.job_queued = false;
    env_.counters->rejected.fetch_add(1);
  }
}

void Session::CompressJob(int layer) {
  const Policy& p = info_.policy;
  {
    MutexLock lock(&mu_);
    LayerStore& s = layers_[layer];
    s.job_queued = false;
    if (s.compressing || s.tail_tokens() < p.dense_window + p.chunk_tokens) return;
    s.compressing = true;
  }
  CompressAndPublish(layer, p.chunk_tokens);
  MutexLock lock(&mu_);
  layers_[layer].compressing = false;
  idle_cv_.notify_all();
  // One chunk per job, then back of the queue: a long prefill does not starve other sessions.
  MaybeSchedule(layer);
}

void Session::CompressAndPublish(int layer, int tokens) {
  const absl::Time start = absl::Now();
  CompressionInput in;
  {
    MutexLock lock(&mu_);
    in = layers_[layer].TakeOldest(tokens);
  }
  std::shared_ptr<const CompressedChunk> chunk =
      CompressRows(info_.layout, info_.policy, layer, in, env_.pools.get());
  const int64_t dense = static_cast<int64_t>(tokens) * info_.layout.token_bytes();
  const int64_t packed = static_cast<int64_t>(chunk->bytes());
  bool closed;
  {
    MutexLock lock(&mu_);
    layers_[layer].Publish(std::move(chunk));
    bytes_ += packed - dense;
    closed = closed_;
  }
  // A chunk is never larger than its dense rows (the format falls back to dense), so this
  // only ever returns bytes. After Close the budget holds none of them (Close released
  // bytes_ as it was, with or without this difference).
  if (!closed) env_.budget->Release(info_.tenant, dense - packed);
  env_.counters->chunks.fetch_add(1);
  env_.counters->tokens.fetch_add(tokens);
  env_.counters->nanos.fetch_add(absl::ToInt64Nanoseconds(absl::Now() - start));
}

int64_t Session::Flush() {
  const Policy& p = info_.policy;
  int64_t total = 0;
  for (int layer = 0; layer < info_.layout.num_layers; ++layer) {
    const bool per_channel =
        (p.k.SparsityFor(layer) > 0 && p.k.direction == PruneDirection::kPerChannel) ||
        (p.v.SparsityFor(layer) > 0 && p.v.direction == PruneDirection::kPerChannel);
    int64_t eligible;
    {
      std::unique_lock<std::mutex> lock(mu_.native());
      idle_cv_.wait(lock, [&] { return !layers_[layer].compressing; });
      layers_[layer].compressing = true;
      eligible = std::max<int64_t>(0, layers_[layer].tail_tokens() - p.dense_window);
    }
    // Whole chunks first, then one remainder chunk (per-channel: whole groups only).
    while (eligible > 0) {
      int n = static_cast<int>(std::min<int64_t>(eligible, p.chunk_tokens));
      if (n < p.chunk_tokens && per_channel) n -= n % p.group_tokens;
      if (n == 0) break;
      CompressAndPublish(layer, n);
      eligible -= n;
      total += n;
    }
    MutexLock lock(&mu_);
    layers_[layer].compressing = false;
    idle_cv_.notify_all();
  }
  return total;
}

absl::StatusOr<int64_t> Session::Read(int layer, int64_t token_begin, int64_t count,
                                      std::string* k_out, std::string* v_out) const {
  const Layout& l = info_.layout;
  if (layer < 0 || layer >= l.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " outside the session's ", l.num_layers, " layers"));
  }
  MutexLock lock(&mu_);
  const LayerStore& s = layers_[layer];
  if (count < 0) count = s.tokens() - token_begin;
  if (token_begin < 0 || count < 0 || token_begin + count > s.tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("tokens [", token_begin, ", ",
                                                   token_begin + count, ") outside layer ", layer,
                                                   "'s ", s.tokens(), " tokens"));
  }
  s.Read(token_begin, count, k_out, v_out);
  return count;
}

SessionInfo Session::Info() const {
  MutexLock lock(&mu_);
  SessionInfo info = info_;
  info.last_access_time = last_access_;
  SessionStats& st = info.stats;
  const Policy& p = info_.policy;
  int64_t elements = 0, k_kept = 0, v_kept = 0, aware_k = 0, aware_v = 0;
  bool queries_seen = false;
  for (const LayerStore& s : layers_) {
    st.tokens_per_layer.push_back(s.tokens());
    st.tokens_total += s.tokens();
    st.bytes_dense += s.dense_bytes();
    st.bytes_compressed += s.compressed_bytes();
    st.chunks += s.chunks();
    elements += s.compressed_elements();
    k_kept += s.k_kept();
    v_kept += s.v_kept();
    aware_k += s.output_aware_chunks_k();
    aware_v += s.output_aware_chunks_v();
    queries_seen |= s.queries_seen();
    const int64_t eligible = s.tail_tokens() - p.dense_window;
    if (eligible >= p.chunk_tokens)
      st.pruning_backlog_tokens += eligible / p.chunk_tokens * p.chunk_tokens;
  }
  st.bytes_dense_equivalent = st.tokens_total * info_.layout.token_bytes();
  if (elements > 0) {
    st.achieved_sparsity_k = static_cast<float>(1.0 - static_cast<double>(k_kept) / elements);
    st.achieved_sparsity_v = static_cast<float>(1.0 - static_cast<double>(v_kept) / elements);
  }
  st.chunks_output_aware_k = aware_k;
  st.chunks_output_aware_v = aware_v;
  auto in_force = [&](const TensorPolicy& tp) {
    return tp.scoring == Scoring::kOutputAware && tp.AnySparse() && queries_seen
               ? Scoring::kOutputAware
               : Scoring::kMagnitude;
  };
  st.scoring_in_force_k = in_force(p.k);
  st.scoring_in_force_v = in_force(p.v);
  // What the kernels will do with the policy's request (attention.h: others run fp32).
  const bool fp16 = p.decode_compute == DecodeCompute::kFloat16 &&
                    info_.layout.dtype == DType::kFloat16 && env_.backend->Fp16Arithmetic();
  st.decode_compute_in_force = fp16 ? DecodeCompute::kFloat16 : DecodeCompute::kFloat32;
  st.decode_steps = decode_steps_;
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
