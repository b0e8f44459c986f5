#include "core/attend.h"

#include <algorithm>
#include <cstdint>

namespace sparsekv {
namespace {

bool SameFormat(const kernels::ChunkRun& r, const CompressedChunk& c) {
  return r.k_format.tokens == c.tokens() && r.k_format.kind == c.k_format().kind &&
         r.v_format.kind == c.v_format().kind && r.k_format.k == c.k_format().k &&
         r.v_format.k == c.v_format().k;
}

}  // namespace

PlannedStep PlanStep(const Layout& layout, const LayerSnapshot& snap, const float* q,
                     const AttendOptions& options, float* out, float* lse, float* tail_mass) {
  const int heads = layout.num_kv_heads;
  PlannedStep step;
  // Runs of one format, in first-appearance order; a chunk joins its format's run (the order
  // of chunks does not change the result).
  std::vector<std::vector<const CompressedChunk*>> members;
  for (const auto& c : *snap.chunks) {
    size_t r = 0;
    while (r < step.runs.size() && !SameFormat(step.runs[r], *c)) ++r;
    if (r == step.runs.size()) {
      kernels::ChunkRun run;
      run.k_format = c->k_format();
      run.v_format = c->v_format();
      step.runs.push_back(run);
      members.emplace_back();
    }
    members[r].push_back(c.get());
  }
  step.refs.reserve(snap.chunks->size() * heads);
  std::vector<size_t> offsets;
  for (size_t r = 0; r < step.runs.size(); ++r) {
    offsets.push_back(step.refs.size());
    step.runs[r].num_chunks = static_cast<int>(members[r].size());
    for (int h = 0; h < heads; ++h)
      for (const CompressedChunk* c : members[r]) step.refs.push_back({c->k(h), c->v(h)});
  }
  for (size_t r = 0; r < step.runs.size(); ++r) step.runs[r].refs = step.refs.data() + offsets[r];

  step.tail.reserve(snap.tail.size() * heads);
  for (int h = 0; h < heads; ++h) {
    for (const BlockRows& b : snap.tail) {
      step.tail.push_back({b.block->k_row(h, b.begin), b.block->v_row(h, b.begin),
                           static_cast<int64_t>(b.end - b.begin)});
    }
  }
  kernels::DecodeBatchItem& it = step.item;
  it.num_kv_heads = heads;
  it.group = layout.group_size();
  it.head_dim = layout.head_dim;
  it.dtype = layout.dtype;
  it.scale = options.scale;
  it.compute = options.compute;
  it.q = q;
  it.out = out;
  it.lse = lse;
  it.runs = step.runs.data();
  it.num_runs = static_cast<int>(step.runs.size());
  it.tail = step.tail.data();
  it.num_tail_spans = static_cast<int>(snap.tail.size());
  it.tail_tokens = snap.tail_tokens;
  it.tokens = snap.tokens;
  it.tail_mass = tail_mass;
  return step;
}

absl::Status FromKernelStatus(const kernels::KernelStatus& s) {
  using Code = kernels::KernelStatus::Code;
  switch (s.code) {
    case Code::kOk:
      return absl::OkStatus();
    case Code::kInvalidArgument:
      return absl::InvalidArgumentError(s.message);
    case Code::kUnavailable:
      return absl::UnavailableError(s.message);
    case Code::kResourceExhausted:
      return absl::ResourceExhaustedError(s.message);
    case Code::kInternal:
      break;
  }
  return absl::InternalError(s.message);
}

absl::Status AttendLayer(const Layout& layout, const LayerSnapshot& snap, const float* q,
                         const kernels::ComputeBackend& backend, const AttendOptions& options,
                         float* out, float* lse, float* tail_mass) {
  const PlannedStep step = PlanStep(layout, snap, q, options, out, lse, tail_mass);
  return FromKernelStatus(backend.Decode({&step.item, 1}));
}

}  // namespace sparsekv
