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
                                                    SlabPoolSet* pools) {
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

  const size_t row = static_cast<size_t>(d) * kernels::DTypeSize(layout.dtype);
  std::vector<uint8_t> kbuf(static_cast<size_t>(in.tokens) * row), vbuf(kbuf.size());
  for (int h = 0; h < heads; ++h) {
    size_t off = 0;
    for (const BlockRows& r : in.rows) {
      for (int i = r.begin; i < r.end; ++i, off += row) {
        std::memcpy(kbuf.data() + off, r.block->k_row(h, i), row);
        std::memcpy(vbuf.data() + off, r.block->v_row(h, i), row);
      }
    }
    const bool ka = Weights(lp.k, true, in, h, d, &tw, &cw) && k_aware;
    kernels::CompressSection(kf, kbuf.data(), ka && !tw.empty() ? tw.data() : nullptr,
                             ka && !cw.empty() ? cw.data() : nullptr, chunk->mutable_k(h));
    const bool va = Weights(lp.v, false, in, h, d, &tw, &cw) && v_aware;
    kernels::CompressSection(vf, vbuf.data(), va && !tw.empty() ? tw.data() : nullptr,
                             va && !cw.empty() ? cw.data() : nullptr, chunk->mutable_v(h));
  }
  return chunk;
}

}  // namespace sparsekv
