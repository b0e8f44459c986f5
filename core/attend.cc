#include "core/attend.h"

#include <algorithm>
#include <cstdint>
#include <utility>

namespace sparsekv {
namespace {

// Chunks of one format (background chunks share one; Flush may add a shorter remainder).
struct ChunkGroup {
  kernels::SectionFormat k_format;
  kernels::SectionFormat v_format;
  std::vector<const CompressedChunk*> chunks;
};

std::vector<ChunkGroup> GroupChunks(const ChunkList& chunks) {
  std::vector<ChunkGroup> groups;
  for (const auto& c : chunks) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const ChunkGroup& g) {
      return g.k_format.tokens == c->tokens() && g.k_format.kind == c->k_format().kind &&
             g.v_format.kind == c->v_format().kind && g.k_format.k == c->k_format().k &&
             g.v_format.k == c->v_format().k;
    });
    if (it == groups.end()) {
      groups.push_back({c->k_format(), c->v_format(), {}});
      it = groups.end() - 1;
    }
    it->chunks.push_back(c.get());
  }
  return groups;
}

// KV head `head`'s rows of tail blocks [begin, end) (all of them by default).
std::vector<kernels::DenseSpan> TailSpans(const LayerSnapshot& snap, int head, size_t begin = 0,
                                          size_t end = SIZE_MAX) {
  end = std::min(end, snap.tail.size());
  std::vector<kernels::DenseSpan> spans;
  spans.reserve(end > begin ? end - begin : 0);
  for (size_t b = begin; b < end; ++b) {
    const BlockRows& r = snap.tail[b];
    spans.push_back({r.block->k_row(head, r.begin), r.block->v_row(head, r.begin),
                     static_cast<int64_t>(r.end - r.begin)});
  }
  return spans;
}

}  // namespace

void AttendLayer(const Layout& layout, const LayerSnapshot& snap, const float* q,
                 const kernels::Backend& backend, const AttendOptions& options, float* out,
                 float* lse) {
  const int heads = layout.num_kv_heads;
  const int group = layout.group_size();
  const int d = layout.head_dim;
  const std::vector<ChunkGroup> groups = GroupChunks(*snap.chunks);

  // Parallel over KV heads, and over row ranges too when there are fewer heads than threads.
  const bool parallel = options.pool && snap.tokens * heads >= options.min_rows_to_split;
  int splits = 1;
  if (parallel) {
    const int threads = options.pool->size() + 1;
    splits = std::max(1, (threads + heads - 1) / heads);
  }
  // Work units: every chunk of every group, then every tail block. Split s takes the units
  // whose first row falls in rows [R*s/splits, R*(s+1)/splits), so a session that is all
  // dense tail (sparsity 0, or young) is split as well as a pruned one. unit_split does not
  // decrease, so each split's units of a group (and of the tail) are one contiguous range.
  std::vector<int> unit_split;
  if (splits > 1) {
    const int64_t total = std::max<int64_t>(1, snap.tokens);
    int64_t row = 0;
    auto assign = [&](int64_t rows) {
      unit_split.push_back(static_cast<int>(std::min<int64_t>(splits - 1, row * splits / total)));
      row += rows;
    };
    for (const ChunkGroup& g : groups)
      for (const CompressedChunk* c : g.chunks) assign(c->tokens());
    for (const BlockRows& r : snap.tail) assign(r.end - r.begin);
  }
  // Task (head, split).
  std::vector<kernels::AttentionState> states(static_cast<size_t>(heads) * splits);
  auto params = [&](int h) {
    kernels::DecodeAttentionParams p;
    p.q = q + static_cast<size_t>(h) * group * d;
    p.group = group;
    p.head_dim = d;
    p.dtype = layout.dtype;
    p.scale = options.scale;
    p.compute = options.compute;
    return p;
  };
  auto task = [&](int i) {
    const int h = i % heads;
    const int s = i / heads;
    kernels::AttentionState& st = states[i];
    st.Reset(group, d);
    kernels::AttentionState part;
    std::vector<kernels::ChunkRef> refs;
    // The units of split s among the n starting at `first`, as [b, e) relative to `first`.
    auto range = [&](size_t first, size_t n) {
      if (splits == 1) return std::pair<size_t, size_t>(0, n);
      const auto begin = unit_split.begin() + static_cast<std::ptrdiff_t>(first);
      const auto [lo, hi] = std::equal_range(begin, begin + static_cast<std::ptrdiff_t>(n), s);
      return std::pair<size_t, size_t>(lo - begin, hi - begin);
    };
    size_t first = 0;
    for (const ChunkGroup& g : groups) {
      const auto [b, e] = range(first, g.chunks.size());
      first += g.chunks.size();
      if (b == e) continue;
      refs.clear();
      for (size_t c = b; c < e; ++c) refs.push_back({g.chunks[c]->k(h), g.chunks[c]->v(h)});
      kernels::DecodeAttentionParams p = params(h);
      p.k_format = g.k_format;
      p.v_format = g.v_format;
      p.chunks = refs.data();
      p.num_chunks = static_cast<int>(refs.size());
      backend.DecodeAttentionPartial(p, &part);
      kernels::MergeAttentionState(part, &st);
    }
    const auto [b, e] = range(first, snap.tail.size());
    if (b != e) {
      const std::vector<kernels::DenseSpan> spans = TailSpans(snap, h, b, e);
      kernels::DecodeAttentionParams p = params(h);
      p.spans = spans.data();
      p.num_spans = static_cast<int>(spans.size());
      backend.DecodeAttentionPartial(p, &part);
      kernels::MergeAttentionState(part, &st);
    }
  };
  const int tasks = heads * splits;
  if (parallel) {
    options.pool->Run(tasks, task);
  } else {
    for (int i = 0; i < tasks; ++i) task(i);
  }
  for (int h = 0; h < heads; ++h) {
    for (int s = 1; s < splits; ++s)
      kernels::MergeAttentionState(states[s * heads + h], &states[h]);
    kernels::FinalizeAttentionState(states[h], out + static_cast<size_t>(h) * group * d,
                                    lse + static_cast<size_t>(h) * group);
  }
}

void TailMass(const Layout& layout, const LayerSnapshot& snap, const float* q, float scale,
              const float* lse, std::vector<float>* mass) {
  const int heads = layout.num_kv_heads;
  const int group = layout.group_size();
  const int d = layout.head_dim;
  mass->assign(static_cast<size_t>(heads) * snap.tail_tokens, 0.0f);
  for (int h = 0; h < heads; ++h) {
    const std::vector<kernels::DenseSpan> spans = TailSpans(snap, h);
    kernels::DecodeAttentionParams p;
    p.q = q + static_cast<size_t>(h) * group * d;
    p.group = group;
    p.head_dim = d;
    p.dtype = layout.dtype;
    p.scale = scale;
    p.spans = spans.data();
    p.num_spans = static_cast<int>(spans.size());
    kernels::AccumulateDenseMass(p, lse + static_cast<size_t>(h) * group,
                                 mass->data() + static_cast<size_t>(h) * snap.tail_tokens);
  }
}

}  // namespace sparsekv
