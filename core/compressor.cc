#include "core/compressor.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace sparsekv {
namespace {

// Weights for one section; returns whether output-aware weights are in force.
bool Weights(const TensorPlan& p, bool is_k, const CompressionInput& in, int head, int d,
             std::vector<float>* token_w, std::vector<float>* channel_w) {
  token_w->clear();
  channel_w->clear();
  if (!p.output_aware || !in.queries_seen) return false;
  if (p.direction == PruneDirection::kPerToken) {
    if (!is_k) return true;  // V per-token output-aware equals magnitude, by design
    channel_w->resize(d);
    for (int j = 0; j < d; ++j) (*channel_w)[j] = std::sqrt(in.q_energy[head * d + j]);
    return true;
  }
  const float* m = in.mass.data() + static_cast<size_t>(head) * in.tokens;
  double total = 0;
  for (int t = 0; t < in.tokens; ++t) total += m[t];
  if (!(total > 0.0)) return false;
  token_w->assign(m, m + in.tokens);
  return true;
}

}  // namespace

std::shared_ptr<const CompressedChunk> CompressRows(const Layout& layout, const PolicyPlan& plan,
                                                    int layer, const CompressionInput& in,
                                                    SlabPoolSet* pools,
                                                    const kernels::ComputeBackend* backend) {
  const kernels::SectionFormat kf = plan.KFormat(layer, in.tokens);
  const kernels::SectionFormat vf = plan.VFormat(layer, in.tokens);
  const LayerPlan& lp = plan.layer(layer);
  const int heads = layout.num_kv_heads;
  const int d = layout.head_dim;
  SlabPool* pool = pools->Get(CompressedChunk::Bytes(kf, vf, heads));
  // Output-awareness is decided per chunk from head 0's statistics (all heads see the same
  // queries, so they agree on whether any exist).
  std::vector<float> tw, cw;
  bool k_aware = Weights(lp.k, true, in, 0, d, &tw, &cw);
  bool v_aware = Weights(lp.v, false, in, 0, d, &tw, &cw);
  auto chunk = std::make_shared<CompressedChunk>(kf, vf, heads, pool, k_aware, v_aware);

  // Every head's K and V rows and weights, then one backend call for all 2 x heads sections.
  const size_t row = static_cast<size_t>(d) * kernels::DTypeSize(layout.dtype);
  const size_t section = static_cast<size_t>(in.tokens) * row;
  std::vector<uint8_t> rows(2 * heads * section);
  std::vector<std::vector<float>> token_w(2 * heads), channel_w(2 * heads);
  std::vector<kernels::CompressJob> jobs(2 * heads);
  for (int h = 0; h < heads; ++h) {
    uint8_t* k = rows.data() + (2 * h) * section;
    uint8_t* v = k + section;
    size_t off = 0;
    for (const BlockRows& r : in.rows) {
      for (int i = r.begin; i < r.end; ++i, off += row) {
        std::memcpy(k + off, r.block->k_row(h, i), row);
        std::memcpy(v + off, r.block->v_row(h, i), row);
      }
    }
    for (int t = 0; t < 2; ++t) {
      const bool is_k = t == 0;
      const int j = 2 * h + t;
      const bool aware = Weights(is_k ? lp.k : lp.v, is_k, in, h, d, &token_w[j], &channel_w[j]) &&
                         (is_k ? k_aware : v_aware);
      kernels::CompressJob& job = jobs[j];
      job.format = is_k ? kf : vf;
      job.rows = is_k ? k : v;
      job.token_weights = aware && !token_w[j].empty() ? token_w[j].data() : nullptr;
      job.channel_weights = aware && !channel_w[j].empty() ? channel_w[j].data() : nullptr;
      job.out = is_k ? chunk->mutable_k(h) : chunk->mutable_v(h);
    }
  }
  static const std::unique_ptr<kernels::ComputeBackend> caller_only = [] {
    kernels::ComputeBackendOptions o;
    o.threads = 0;
    return kernels::MakeCpuComputeBackend(o);
  }();
  if (backend == nullptr) backend = caller_only.get();
  if (!backend->Compress({jobs.data(), static_cast<int>(jobs.size())}).ok()) return nullptr;
  return chunk;
}

}  // namespace sparsekv
