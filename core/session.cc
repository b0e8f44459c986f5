#include "core/session.h"

#include <cmath>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/attend.h"
#include "core/compressor.h"
#include "kernels/finite_check.h"

namespace sparsekv {
namespace {

// Index of the first unstorable value in `n` stored elements at `data`, as the append check.
int64_t FirstUnstorable(DType dtype, const char* data, size_t n) {
  return kernels::FindUnstorable(dtype, data, n, dtype);
}

// The values a session image brings, checked as an append's are: with reject_nonfinite no NaN
// or Inf among the stored K/V (a snapshot from a server that stores them, or damaged content
// whose checksums were recomputed); the scoring statistics always finite and >= 0, since one
// NaN would bias the layer's output-aware pruning for good. Chunks whose size does not match
// their formats are left to LayerStore::Restore, which refuses them.
absl::Status CheckImageValues(const SessionImage& image, const Layout& l, bool reject_nonfinite) {
  const size_t esize = DTypeSize(l.dtype);
  for (size_t li = 0; li < image.layers.size(); ++li) {
    const LayerImage& layer = image.layers[li];
    for (float m : layer.tail_mass) {
      if (!(m >= 0.0f) || !std::isfinite(m)) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", li, ": tail attention mass ", m, " (must be finite and >= 0)"));
      }
    }
    for (double e : layer.q_energy) {
      if (!(e >= 0.0) || !std::isfinite(e)) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", li, ": query energy ", e, " (must be finite and >= 0)"));
      }
    }
    if (!reject_nonfinite) continue;
    for (const std::string* t : {&layer.tail_k, &layer.tail_v}) {
      const int64_t bad = FirstUnstorable(l.dtype, t->data(), t->size() / esize);
      if (bad >= 0) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", li, ": dense tail ",
                                                       t == &layer.tail_k ? "K" : "V", " element ",
                                                       bad, " is not finite"));
      }
    }
    for (size_t ci = 0; ci < layer.chunks.size(); ++ci) {
      const LayerImage::Chunk& c = layer.chunks[ci];
      if (!ValidateSectionFormat(c.k_format, l, "K").ok() ||
          !ValidateSectionFormat(c.v_format, l, "V").ok() ||
          c.data.size() != CompressedChunk::Bytes(c.k_format, c.v_format, l.num_kv_heads)) {
        continue;
      }
      size_t offset = 0;
      for (int h = 0; h < l.num_kv_heads; ++h) {
        for (const kernels::SectionFormat* f : {&c.k_format, &c.v_format}) {
          const int64_t bad = FirstUnstorable(l.dtype, c.data.data() + offset + f->bitmap_bytes(),
                                              f->values_bytes() / esize);
          if (bad >= 0) {
            return absl::InvalidArgumentError(
                absl::StrCat("layer ", li, ": chunk ", ci, " KV head ", h, " ",
                             f == &c.k_format ? "K" : "V", " kept value ", bad, " is not finite"));
          }
          offset += f->bytes();
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<double> ChunkSecondsBounds() {
  return {1e-5, 2.5e-5, 5e-5,   1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
          5e-3, 1e-2,   2.5e-2, 5e-2, 0.1,    0.25, 0.5,  1.0};
}

Session::Session(SessionInfo info, SessionEnv env)
    : env_(std::move(env)),
      info_(std::move(info)),
      plan_(info_.layout, info_.policy),
      block_bytes_(LayerStore::BlockBytes(info_.layout)) {
  layers_.reserve(info_.layout.num_layers);
  for (int l = 0; l < info_.layout.num_layers; ++l) layers_.emplace_back(info_.layout);
  last_access_ = info_.create_time;
  bytes_ = FixedBytes(info_);
  // A session that prunes nothing would measure an error of 0: no shadow.
  if (env_.quality && (info_.policy.k.AnySparse() || info_.policy.v.AnySparse()) &&
      env_.quality->Selects(info_.id)) {
    MutexLock lock(&mu_);
    shadow_ = QualityShadow::Start(info_.layout, info_.tenant, env_.quality, env_.budget);
  }
}

Session::~Session() { Close(); }

int64_t Session::FixedBytes(const SessionInfo& info) {
  int64_t labels = 0;
  for (const auto& [key, value] : info.labels) {
    labels += static_cast<int64_t>(key.size() + value.size()) + 64;  // + map node
  }
  return static_cast<int64_t>(sizeof(Session)) +
         info.layout.num_layers * LayerStore::FixedBytes(info.layout) +
         static_cast<int64_t>(info.id.size() + info.tenant.size()) + labels +
         static_cast<int64_t>(sizeof(float)) *
             static_cast<int64_t>(info.policy.k.layer_sparsity.size() +
                                  info.policy.v.layer_sparsity.size());
}

int64_t Session::Close() {
  MutexLock lock(&mu_);
  if (closed_) return 0;
  closed_ = true;
  const int64_t shadow = shadow_ ? shadow_->bytes() : 0;
  shadow_.reset();  // returns its own bytes
  if (bytes_ > 0) env_.budget->Release(info_.tenant, bytes_);
  return bytes_ + shadow;
}

void Session::DropShadowLocked() {
  env_.quality->CountDropped();
  shadow_.reset();
}

absl::Status Session::Reserve(int64_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  MutexLock lock(&mu_);
  const int64_t cap = env_.limits.max_session_bytes;
  if (cap > 0 && bytes_ + pending_ + bytes > cap) {
    return absl::ResourceExhaustedError(absl::StrCat("session \"", info_.id, "\" would hold ",
                                                     bytes_ + pending_ + bytes, " bytes, over ",
                                                     cap, " (--max_session_bytes)"));
  }
  absl::Status st = env_.budget->Reserve(info_.tenant, bytes);
  if (!st.ok() && shadow_) {
    // The session's own quality shadow yields before its cache does.
    DropShadowLocked();
    st = env_.budget->Reserve(info_.tenant, bytes);
  }
  SPARSEKV_RETURN_IF_ERROR(st);
  pending_ += bytes;
  return absl::OkStatus();
}

void Session::Unreserve(int64_t bytes) {
  if (bytes == 0) return;
  MutexLock lock(&mu_);
  pending_ -= bytes;
  env_.budget->Release(info_.tenant, bytes);
}

void Session::Settle(int64_t reserved, int64_t used) {
  if (used <= reserved) {
    Unreserve(reserved - used);
    return;
  }
  // More than reserved: memory already allocated, accounted without a limit check.
  MutexLock lock(&mu_);
  pending_ += used - reserved;
  env_.budget->Charge(info_.tenant, used - reserved);
}

void Session::CommitLocked(int64_t bytes) {
  pending_ -= bytes;
  bytes_ += bytes;
  if (closed_) env_.budget->Release(info_.tenant, bytes);
}

void Session::Touch() {
  MutexLock lock(&mu_);
  TouchLocked();
}

void Session::TouchLocked() { last_access_ = absl::Now(); }

float Session::Scale(float requested) const {
  return requested > 0.0f ? requested : 1.0f / std::sqrt(static_cast<float>(info_.layout.head_dim));
}

absl::Status Session::CheckKvShape(const TensorView& t, const char* name,
                                   const std::vector<int64_t>& want) const {
  if (t.shape != want) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has shape ", ShapeString(t.shape), ", want ", ShapeString(want)));
  }
  return absl::OkStatus();
}

absl::Status Session::CheckValues(const TensorView& t, const char* name, DType storage) const {
  if (!env_.limits.reject_nonfinite || t.empty()) return absl::OkStatus();
  const int64_t bad =
      kernels::FindUnstorable(t.dtype, t.data, static_cast<size_t>(t.num_elements()), storage);
  if (bad < 0) return absl::OkStatus();
  const float value = kernels::LoadAsFloat(t.dtype, t.data, static_cast<size_t>(bad));
  if (std::isfinite(value)) {
    return absl::InvalidArgumentError(absl::StrCat(name, "[flat index ", bad, "] = ", value,
                                                   " overflows the session's ",
                                                   kernels::DTypeName(storage), " storage"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(name, "[flat index ", bad, "] is ", value, ": values must be finite"));
}

absl::Status Session::CheckAppend(int layer_begin, const TensorView& k, const TensorView& v,
                                  const TensorView& obs_q) const {
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
  if (k.dtype != v.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("k is ", kernels::DTypeName(k.dtype),
                                                   " but v is ", kernels::DTypeName(v.dtype)));
  }
  if (layer_begin < 0 || layer_begin + layers > l.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layers [", layer_begin, ", ",
                                                   layer_begin + layers, ") outside the session's ",
                                                   l.num_layers, " layers"));
  }
  if (!obs_q.empty()) {
    if (obs_q.shape.size() != 4 || obs_q.shape[0] != layers || obs_q.shape[2] != l.num_q_heads ||
        obs_q.shape[3] != l.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "obs_q has shape ", ShapeString(obs_q.shape), ", want [layers=", layers,
          ", obs_tokens, num_q_heads=", l.num_q_heads, ", head_dim=", l.head_dim, "]"));
    }
    if (obs_q.shape[1] > env_.limits.max_obs_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("obs_q has ", obs_q.shape[1], " tokens per layer, more than ",
                       env_.limits.max_obs_tokens, " (--max_obs_tokens)"));
    }
  }
  SPARSEKV_RETURN_IF_ERROR(CheckValues(k, "k", l.dtype));
  SPARSEKV_RETURN_IF_ERROR(CheckValues(v, "v", l.dtype));
  SPARSEKV_RETURN_IF_ERROR(CheckValues(obs_q, "obs_q", DType::kFloat32));
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Session::Append(int layer_begin, const TensorView& k, const TensorView& v,
                                        const TensorView& obs_q, const CancelCheck& cancel) {
  SPARSEKV_RETURN_IF_ERROR(CheckAppend(layer_begin, k, v, obs_q));
  const Layout& l = info_.layout;
  const int64_t layers = k.shape[0];
  const int64_t tokens = k.shape[1];
  // The blocks the rows need, reserved before anything is applied (Settle squares the count
  // with what the append used, which differs only if another append to the same layers ran
  // in between).
  int64_t reserved = 0;
  {
    MutexLock lock(&mu_);
    for (int64_t i = 0; i < layers; ++i) {
      reserved += layers_[layer_begin + i].BlocksNeeded(tokens) * block_bytes_;
    }
  }
  SPARSEKV_RETURN_IF_ERROR(Reserve(reserved));
  int64_t blocks = 0;
  if (!obs_q.empty()) {
    const absl::Status st = AppendObserved(layer_begin, k, v, obs_q, cancel, &blocks);
    if (!st.ok()) {
      Unreserve(reserved);
      return st;
    }
  } else {
    if (cancel) {
      const absl::Status st = cancel();
      if (!st.ok()) {
        Unreserve(reserved);
        return st;
      }
    }
    const size_t head_stride = static_cast<size_t>(l.head_dim) * kernels::DTypeSize(k.dtype);
    const size_t token_stride = head_stride * l.num_kv_heads;
    const size_t layer_stride = token_stride * tokens;
    for (int64_t i = 0; i < layers; ++i) {
      const int layer = layer_begin + static_cast<int>(i);
      const uint8_t* layer_k = static_cast<const uint8_t*>(k.data) + i * layer_stride;
      const uint8_t* layer_v = static_cast<const uint8_t*>(v.data) + i * layer_stride;
      MutexLock lock(&mu_);
      const int64_t n =
          layers_[layer].Append(k.dtype, layer_k, layer_v, tokens, token_stride, head_stride);
      if (shadow_ &&
          !shadow_->Append(layer, k.dtype, layer_k, layer_v, tokens, token_stride, head_stride)) {
        DropShadowLocked();
      }
      CommitLocked(n * block_bytes_);
      ++generation_;
      blocks += n;
      TouchLocked();
      MaybeSchedule(layer);
    }
  }
  Settle(reserved, blocks * block_bytes_);
  return layers * tokens;
}

absl::Status Session::AppendObserved(int layer_begin, const TensorView& k, const TensorView& v,
                                     const TensorView& obs_q, const CancelCheck& cancel,
                                     int64_t* blocks) {
  const Layout& l = info_.layout;
  const int64_t layers = k.shape[0];
  const int64_t tokens = k.shape[1];
  const int64_t obs_tokens = obs_q.shape[1];
  const size_t head_stride = static_cast<size_t>(l.head_dim) * kernels::DTypeSize(k.dtype);
  const size_t token_stride = head_stride * l.num_kv_heads;
  const size_t layer_stride = token_stride * tokens;
  const size_t q_elems = static_cast<size_t>(l.num_q_heads) * l.head_dim;
  const float scale = Scale(0.0f);
  // Per layer: the snapshot the queries saw (existing rows + staged new rows), the staged rows
  // and the statistics they produced, applied together at the end.
  struct Staged {
    LayerSnapshot snap;
    std::vector<BlockRows> rows;
    std::vector<float> mass;
    std::vector<double> energy;
    bool seen = false;
  };
  std::vector<Staged> staged(layers);
  std::vector<float> q(q_elems), out(q_elems), lse(l.num_q_heads), step_mass;
  for (int64_t i = 0; i < layers; ++i) {
    const int layer = layer_begin + static_cast<int>(i);
    Staged& st = staged[i];
    {
      MutexLock lock(&mu_);
      st.snap = layers_[layer].Snapshot();
    }
    LayerStore stage(l);
    stage.Append(k.dtype, static_cast<const uint8_t*>(k.data) + i * layer_stride,
                 static_cast<const uint8_t*>(v.data) + i * layer_stride, tokens, token_stride,
                 head_stride);
    st.rows = stage.Snapshot().tail;
    st.snap.tail.insert(st.snap.tail.end(), st.rows.begin(), st.rows.end());
    st.snap.tokens += tokens;
    st.snap.tail_tokens += tokens;
    st.energy.assign(static_cast<size_t>(l.num_kv_heads) * l.head_dim, 0.0);
    // These steps only feed statistics: they run fp32 whatever the policy's decode_compute.
    for (int64_t t = 0; t < obs_tokens; ++t) {
      if (cancel) SPARSEKV_RETURN_IF_ERROR(cancel());
      kernels::ConvertElements(
          obs_q.dtype,
          static_cast<const uint8_t*>(obs_q.data) +
              ((i * obs_tokens + t) * q_elems) * kernels::DTypeSize(obs_q.dtype),
          DType::kFloat32, q.data(), q_elems);
      if (plan_.needs_mass())
        step_mass.resize(static_cast<size_t>(l.num_kv_heads) * st.snap.tail_tokens);
      SPARSEKV_RETURN_IF_ERROR(AttendLayer(l, st.snap, q.data(), *env_.backend,
                                           AttendOptions{scale}, out.data(), lse.data(),
                                           plan_.needs_mass() ? step_mass.data() : nullptr));
      st.seen |= AccumulateScoring(q.data(), lse.data(), step_mass, &st.mass, &st.energy);
    }
  }
  if (cancel) SPARSEKV_RETURN_IF_ERROR(cancel());
  for (int64_t i = 0; i < layers; ++i) {
    const int layer = layer_begin + static_cast<int>(i);
    MutexLock lock(&mu_);
    // Mass lands in the staged blocks too (they are the snapshot's last rows), and travels
    // with their rows into the layer.
    if (staged[i].seen) ApplyScoringLocked(layer, staged[i].snap, staged[i].mass, staged[i].energy);
    const int64_t n = layers_[layer].AppendStaged(staged[i].rows);
    if (shadow_ && !shadow_->AppendStaged(layer, staged[i].rows)) DropShadowLocked();
    CommitLocked(n * block_bytes_);
    ++generation_;
    *blocks += n;
    TouchLocked();
    MaybeSchedule(layer);
  }
  return absl::OkStatus();
}

bool Session::AccumulateScoring(const float* q, const float* lse,
                                const std::vector<float>& step_mass, std::vector<float>* mass,
                                std::vector<double>* energy) const {
  const Layout& l = info_.layout;
  for (int h = 0; h < l.num_q_heads; ++h) {
    if (!std::isfinite(lse[h])) return false;
  }
  LayerStore::AccumulateQueryEnergy(l, q, energy->data());
  if (!plan_.needs_mass()) return true;
  if (mass->empty()) {
    *mass = step_mass;
  } else {
    for (size_t i = 0; i < step_mass.size(); ++i) (*mass)[i] += step_mass[i];
  }
  return true;
}

void Session::ApplyScoringLocked(int layer, const LayerSnapshot& snap,
                                 const std::vector<float>& mass,
                                 const std::vector<double>& energy) {
  LayerStore& store = layers_[layer];
  ++generation_;
  store.AddQueryEnergy(energy.data());
  if (mass.empty()) return;
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
    // One conversion serves both rows: their dtypes must agree (else V would be read with
    // K's element size, past the end of its buffer).
    if (in.new_k.dtype != in.new_v.dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat("new_k is ", kernels::DTypeName(in.new_k.dtype), " but new_v is ",
                       kernels::DTypeName(in.new_v.dtype)));
    }
  }
  if (!(in.scale >= 0.0f) || std::isinf(in.scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale must be finite and >= 0 (0 = 1/sqrt(head_dim)), got ", in.scale));
  }
  SPARSEKV_RETURN_IF_ERROR(CheckValues(in.q, "q", DType::kFloat32));
  SPARSEKV_RETURN_IF_ERROR(CheckValues(in.new_k, "new_k", l.dtype));
  SPARSEKV_RETURN_IF_ERROR(CheckValues(in.new_v, "new_v", l.dtype));
  return absl::OkStatus();
}

int64_t Session::DecodeBytes(const DecodeInput& in) const {
  if (in.new_k.empty()) return 0;
  MutexLock lock(&mu_);
  return layers_[in.layer].BlocksNeeded(1) * block_bytes_;
}

absl::Status Session::Decode(const DecodeInput& in, DecodeOutput* out) {
  SPARSEKV_RETURN_IF_ERROR(CheckDecode(in));
  const int64_t reserved = DecodeBytes(in);
  SPARSEKV_RETURN_IF_ERROR(Reserve(reserved));
  return DecodeReserved(in, reserved, out);
}

absl::Status Session::DecodeReserved(const DecodeInput& in, int64_t reserved, DecodeOutput* out) {
  PreparedDecode step = PrepareDecode(in, reserved);
  const std::vector<kernels::DecodeBatchItem> items = step.items();
  SPARSEKV_RETURN_IF_ERROR(
      FromKernelStatus(env_.backend->Decode({items.data(), static_cast<int>(items.size())})));
  FinishDecode(&step, out);
  return absl::OkStatus();
}

Session::PreparedDecode Session::PrepareDecode(const DecodeInput& in, int64_t reserved) {
  const Layout& l = info_.layout;
  PreparedDecode p;
  p.layer = in.layer;
  p.want_lse = in.want_lse;
  p.q.resize(static_cast<size_t>(l.num_q_heads) * l.head_dim);
  kernels::ConvertElements(in.q.dtype, in.q.data, DType::kFloat32, p.q.data(), p.q.size());
  p.out.assign(p.q.size(), 0.0f);
  p.lse.resize(l.num_q_heads);
  int64_t used = 0;
  {
    MutexLock lock(&mu_);
    LayerStore& layer = layers_[in.layer];
    if (!in.new_k.empty()) {
      const size_t head_stride =
          static_cast<size_t>(l.head_dim) * kernels::DTypeSize(in.new_k.dtype);
      const auto* k = static_cast<const uint8_t*>(in.new_k.data);
      const auto* v = static_cast<const uint8_t*>(in.new_v.data);
      used = block_bytes_ * layer.Append(in.new_k.dtype, k, v, 1, 0, head_stride);
      if (shadow_ && !shadow_->Append(in.layer, in.new_k.dtype, k, v, 1, 0, head_stride)) {
        DropShadowLocked();
      }
      CommitLocked(used);
      MaybeSchedule(in.layer);
    }
    p.snap = layer.Snapshot();
    if (shadow_) {
      p.shadow = std::make_unique<PreparedDecode::Shadow>();
      p.shadow->snap = shadow_->Snapshot(in.layer);
    }
    ++decode_steps_;
    ++generation_;
    TouchLocked();
  }
  Settle(reserved, used);
  if (plan_.needs_mass()) p.mass.resize(static_cast<size_t>(l.num_kv_heads) * p.snap.tail_tokens);
  AttendOptions options;
  options.scale = Scale(in.scale);
  options.compute = info_.policy.decode_compute;
  p.plan = PlanStep(l, p.snap, p.q.data(), options, p.out.data(), p.lse.data(),
                    plan_.needs_mass() ? p.mass.data() : nullptr);
  if (p.shadow) {
    // Same query, scale and arithmetic over the never-pruned rows: the two outputs differ by
    // what pruning removed (both read the same storage-dtype values).
    p.shadow->out.assign(p.q.size(), 0.0f);
    p.shadow->lse.resize(l.num_q_heads);
    p.shadow->plan = PlanStep(l, p.shadow->snap, p.q.data(), options, p.shadow->out.data(),
                              p.shadow->lse.data(), nullptr);
  }
  return p;
}

std::vector<kernels::DecodeBatchItem> Session::PreparedDecode::items() const {
  std::vector<kernels::DecodeBatchItem> items{plan.item};
  if (shadow) items.push_back(shadow->plan.item);
  return items;
}

void Session::FinishDecode(PreparedDecode* p, DecodeOutput* out) {
  // With kFloat16 this lse carries the step's ~1e-3 error into the fp32 tail mass, as a
  // factor per query head that changes from step to step: per-channel output-aware ranking
  // may break near-ties differently (tests/eval/attention_quality.py, fp16 store, 70%: up to
  // 0.5% of keep/drop decisions differ, error vs dense within 1%). An fp32 lse would cost the
  // full fp32 step that kFloat16 saves.
  std::vector<float> mass;
  std::vector<double> energy(static_cast<size_t>(info_.layout.num_kv_heads) * info_.layout.head_dim,
                             0.0);
  if (AccumulateScoring(p->q.data(), p->lse.data(), p->mass, &mass, &energy)) {
    MutexLock lock(&mu_);
    ApplyScoringLocked(p->layer, p->snap, mass, energy);
  }
  if (p->shadow) {
    env_.quality->RecordError(
        RelativeError(p->out.data(), p->shadow->out.data(), p->shadow->out.size()));
  }
  out->out = std::move(p->out);
  if (p->want_lse) out->lse = std::move(p->lse);
  out->tokens_attended = p->snap.tokens;
}

void Session::MaybeSchedule(int layer) {
  LayerStore& s = layers_[layer];
  if (s.job_queued || s.compressing || !plan_.Eligible(s.tail_tokens())) return;
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
  {
    MutexLock lock(&mu_);
    LayerStore& s = layers_[layer];
    s.job_queued = false;
    if (s.compressing || !plan_.Eligible(s.tail_tokens())) return;
    s.compressing = true;
  }
  CompressAndPublish(layer, plan_.chunk_tokens());
  MutexLock lock(&mu_);
  layers_[layer].compressing = false;
  idle_cv_.notify_all();
  // One chunk per job, then back of the queue: a long prefill does not starve other sessions.
  MaybeSchedule(layer);
}

bool Session::CompressAndPublish(int layer, int tokens) {
  const absl::Time start = absl::Now();
  CompressionInput in;
  {
    MutexLock lock(&mu_);
    in = layers_[layer].TakeOldest(tokens);
  }
  std::shared_ptr<const CompressedChunk> chunk =
      CompressRows(info_.layout, plan_, layer, in, env_.pools.get(), env_.backend.get());
  if (!chunk) {
    // The backend failed (a device error): the rows stay dense; the next job tries again.
    env_.counters->failed.fetch_add(1);
    return false;
  }
  const int64_t chunk_bytes = static_cast<int64_t>(chunk->memory_bytes());
  {
    MutexLock lock(&mu_);
    // A chunk of whole blocks' rows (every background job: chunk_tokens is a multiple of the
    // 32-row block) releases at least as many bytes as it takes, since a chunk is never larger
    // than its dense rows. A short remainder (Flush) may release no block: then the chunk must
    // fit the budgets like any request, or the rows stay dense.
    const int64_t net = chunk_bytes - layers_[layer].BlocksReleasedBy(tokens) * block_bytes_;
    if (net > 0 && !closed_) {
      const int64_t cap = env_.limits.max_session_bytes;
      if ((cap > 0 && bytes_ + pending_ + net > cap) ||
          !env_.budget->Reserve(info_.tenant, net).ok()) {
        return false;
      }
    }
    layers_[layer].Publish(std::move(chunk));
    ++generation_;
    bytes_ += net;
    if (!closed_ && net < 0) env_.budget->Release(info_.tenant, -net);
  }
  env_.counters->chunks.fetch_add(1);
  env_.counters->tokens.fetch_add(tokens);
  const absl::Duration took = absl::Now() - start;
  env_.counters->nanos.fetch_add(absl::ToInt64Nanoseconds(took));
  env_.counters->chunk_seconds.Observe(absl::ToDoubleSeconds(took));
  return true;
}

FlushResult Session::Flush() {
  FlushResult result;
  for (int layer = 0; layer < info_.layout.num_layers; ++layer) {
    std::vector<int> chunks;
    {
      std::unique_lock<std::mutex> lock(mu_.native());
      idle_cv_.wait(lock, [&] { return !layers_[layer].compressing; });
      layers_[layer].compressing = true;
      chunks = plan_.FlushChunks(layer, layers_[layer].tail_tokens());
    }
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (!CompressAndPublish(layer, chunks[i])) {  // a remainder over the budget stays dense
        for (size_t j = i; j < chunks.size(); ++j) result.left_dense += chunks[j];
        break;
      }
      result.compressed += chunks[i];
    }
    MutexLock lock(&mu_);
    layers_[layer].compressing = false;
    idle_cv_.notify_all();
  }
  return result;
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

SessionImage Session::Export(uint64_t* generation) const {
  SessionImage image;
  image.info = info_;
  std::vector<LayerExport> parts;
  parts.reserve(info_.layout.num_layers);
  {
    MutexLock lock(&mu_);
    image.info.last_access_time = last_access_;
    image.decode_steps = decode_steps_;
    if (generation != nullptr) *generation = generation_;
    for (const LayerStore& l : layers_) parts.push_back(l.BeginExport());
  }
  image.layers.reserve(parts.size());
  for (const LayerExport& p : parts) {
    image.layers.push_back(LayerStore::FinishExport(info_.layout, p));
  }
  return image;
}

uint64_t Session::generation() const {
  MutexLock lock(&mu_);
  return generation_;
}

absl::Status Session::Restore(const SessionImage& image) {
  // What the layers will hold, reserved first: whole tail blocks and each chunk's pool block
  // (payload rounded up to 64 bytes) and object.
  int64_t need = 0;
  for (const LayerImage& l : image.layers) {
    const int64_t rows = std::max<int64_t>(l.tail_tokens, 0) + std::max(l.tail_first_row, 0);
    need += (rows + DenseBlock::kRows - 1) / DenseBlock::kRows * block_bytes_;
    for (const LayerImage::Chunk& c : l.chunks) {
      need += static_cast<int64_t>(
          (CompressedChunk::Bytes(c.k_format, c.v_format, info_.layout.num_kv_heads) + 63) / 64 *
              64 +
          sizeof(CompressedChunk));
    }
  }
  SPARSEKV_RETURN_IF_ERROR(CheckImageValues(image, info_.layout, env_.limits.reject_nonfinite));
  SPARSEKV_RETURN_IF_ERROR(Reserve(need));
  int64_t used = 0;
  absl::Status st;
  {
    MutexLock lock(&mu_);
    shadow_.reset();  // its empty layers would no longer mirror the session's
    for (size_t i = 0; i < layers_.size() && i < image.layers.size(); ++i) {
      absl::StatusOr<int64_t> blocks = layers_[i].Restore(image.layers[i], env_.pools.get());
      if (!blocks.ok()) {
        st = absl::Status(blocks.status().code(),
                          absl::StrCat("layer ", i, ": ", blocks.status().message()));
        break;
      }
      const int64_t u = *blocks * block_bytes_ + layers_[i].chunk_memory_bytes();
      CommitLocked(u);
      used += u;
    }
    decode_steps_ = image.decode_steps;
    ++generation_;
  }
  Settle(need, used);
  if (st.ok()) {
    MutexLock lock(&mu_);
    for (int l = 0; l < info_.layout.num_layers; ++l) MaybeSchedule(l);
  }
  return st;
}

SessionInfo Session::Info() const {
  MutexLock lock(&mu_);
  SessionInfo info = info_;
  info.last_access_time = last_access_;
  SessionStats& st = info.stats;
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
    const int64_t eligible = s.tail_tokens() - plan_.dense_window();
    if (plan_.Eligible(s.tail_tokens()))
      st.pruning_backlog_tokens += eligible / plan_.chunk_tokens() * plan_.chunk_tokens();
  }
  st.bytes_dense_equivalent = st.tokens_total * info_.layout.token_bytes();
  st.compressed_elements = elements;
  st.kept_k = k_kept;
  st.kept_v = v_kept;
  if (elements > 0) {
    st.achieved_sparsity_k = static_cast<float>(1.0 - static_cast<double>(k_kept) / elements);
    st.achieved_sparsity_v = static_cast<float>(1.0 - static_cast<double>(v_kept) / elements);
  }
  st.chunks_output_aware_k = aware_k;
  st.chunks_output_aware_v = aware_v;
  auto in_force = [&](bool output_aware) {
    return output_aware && queries_seen ? Scoring::kOutputAware : Scoring::kMagnitude;
  };
  st.scoring_in_force_k = in_force(plan_.k_output_aware());
  st.scoring_in_force_v = in_force(plan_.v_output_aware());
  // What the kernels will do with the policy's request (attention.h: others run fp32).
  const bool fp16 = info_.policy.decode_compute == DecodeCompute::kFloat16 &&
                    info_.layout.dtype == DType::kFloat16 && env_.backend->Fp16Arithmetic();
  st.decode_compute_in_force = fp16 ? DecodeCompute::kFloat16 : DecodeCompute::kFloat32;
  st.decode_steps = decode_steps_;
  st.bytes_shadow = shadow_ ? shadow_->bytes() : 0;
  st.bytes_accounted = bytes_ + st.bytes_shadow;
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
