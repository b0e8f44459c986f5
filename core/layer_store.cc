#include "core/layer_store.h"

#include <algorithm>
#include <cstring>

namespace sparsekv {

LayerStore::LayerStore(const Layout& layout)
    : layout_(layout),
      chunks_(std::make_shared<const ChunkList>()),
      q_energy_(static_cast<size_t>(layout.num_kv_heads) * layout.head_dim, 0.0f) {}

void LayerStore::Append(kernels::DType src, const uint8_t* k, const uint8_t* v, int64_t tokens,
                        size_t token_stride, size_t head_stride) {
  const int heads = layout_.num_kv_heads;
  const int d = layout_.head_dim;
  for (int64_t t = 0; t < tokens; ++t) {
    if (tail_.empty() || tail_.back()->rows == DenseBlock::kRows) {
      tail_.push_back(std::make_shared<DenseBlock>(heads, d, layout_.dtype));
    }
    DenseBlock& b = *tail_.back();
    for (int h = 0; h < heads; ++h) {
      const size_t off = t * token_stride + h * head_stride;
      kernels::ConvertElements(src, k + off, layout_.dtype, b.k_row(h, b.rows), d);
      kernels::ConvertElements(src, v + off, layout_.dtype, b.v_row(h, b.rows), d);
      b.mass(h)[b.rows] = 0.0f;
    }
    ++b.rows;
  }
  tail_tokens_ += tokens;
}

LayerSnapshot LayerStore::Snapshot() const {
  LayerSnapshot s;
  s.chunks = chunks_;
  s.tail.reserve(tail_.size());
  for (const auto& b : tail_) {
    if (b->rows > b->begin) s.tail.push_back({b, b->begin, b->rows});
  }
  s.tokens = tokens();
  s.tail_tokens = tail_tokens_;
  return s;
}

void LayerStore::AddQueryEnergy(const float* q) {
  const int d = layout_.head_dim;
  const int group = layout_.group_size();
  for (int h = 0; h < layout_.num_q_heads; ++h) {
    float* e = q_energy_.data() + static_cast<size_t>(h / group) * d;
    for (int j = 0; j < d; ++j) e[j] += q[h * d + j] * q[h * d + j];
  }
  queries_seen_ = true;
}

void LayerStore::AddMass(const LayerSnapshot& snapshot, int head, const float* mass) {
  size_t i = 0;
  for (const BlockRows& r : snapshot.tail) {
    float* m = r.block->mass(head);
    // Rows before block->begin were compressed after the snapshot: their mass no longer
    // matters.
    for (int row = r.begin; row < r.end; ++row, ++i) {
      if (row >= r.block->begin) m[row] += mass[i];
    }
  }
}

CompressionInput LayerStore::TakeOldest(int tokens) const {
  CompressionInput in;
  in.tokens = tokens;
  in.q_energy = q_energy_;
  in.queries_seen = queries_seen_;
  const int heads = layout_.num_kv_heads;
  in.mass.resize(static_cast<size_t>(heads) * tokens);
  int taken = 0;
  for (const auto& b : tail_) {
    if (taken == tokens) break;
    const int n = std::min(b->rows - b->begin, tokens - taken);
    if (n <= 0) continue;
    in.rows.push_back({b, b->begin, b->begin + n});
    for (int h = 0; h < heads; ++h) {
      std::memcpy(in.mass.data() + static_cast<size_t>(h) * tokens + taken, b->mass(h) + b->begin,
                  n * sizeof(float));
    }
    taken += n;
  }
  return in;
}

void LayerStore::Publish(std::shared_ptr<const CompressedChunk> chunk) {
  int left = chunk->tokens();
  while (left > 0) {
    DenseBlock& b = *tail_.front();
    const int n = std::min(b.rows - b.begin, left);
    b.begin += n;
    left -= n;
    if (b.begin == DenseBlock::kRows) tail_.pop_front();
  }
  const int64_t elems =
      static_cast<int64_t>(chunk->tokens()) * layout_.num_kv_heads * layout_.head_dim;
  k_kept_ += static_cast<int64_t>(elems * chunk->k_format().kept_fraction() + 0.5);
  v_kept_ += static_cast<int64_t>(elems * chunk->v_format().kept_fraction() + 0.5);
  output_aware_k_ += chunk->k_output_aware();
  output_aware_v_ += chunk->v_output_aware();
  compressed_tokens_ += chunk->tokens();
  tail_tokens_ -= chunk->tokens();
  compressed_bytes_ += static_cast<int64_t>(chunk->bytes());
  auto next = std::make_shared<ChunkList>(*chunks_);
  next->push_back(std::move(chunk));
  chunks_ = std::move(next);
}

int64_t LayerStore::compressed_elements() const {
  return compressed_tokens_ * layout_.num_kv_heads * layout_.head_dim;
}

int64_t LayerStore::dense_bytes() const { return tail_tokens_ * layout_.token_bytes(); }

void LayerStore::Read(int64_t begin, int64_t count, std::string* k_out, std::string* v_out) const {
  const int heads = layout_.num_kv_heads;
  const size_t row = static_cast<size_t>(layout_.head_dim) * kernels::DTypeSize(layout_.dtype);
  const size_t old = k_out->size();
  k_out->resize(old + count * heads * row);
  v_out->resize(v_out->size() + count * heads * row);
  char* kd = k_out->data() + old;
  char* vd = v_out->data() + v_out->size() - count * heads * row;
  const int64_t end = begin + count;
  int64_t pos = 0;  // first token of the current chunk or block
  std::vector<uint8_t> kbuf, vbuf;
  for (const auto& c : *chunks_) {
    const int64_t cb = pos, ce = pos + c->tokens();
    pos = ce;
    if (ce <= begin || cb >= end) continue;
    kbuf.resize(c->tokens() * row);
    vbuf.resize(kbuf.size());
    for (int h = 0; h < heads; ++h) {
      kernels::DecompressSection(c->k_format(), c->k(h), kbuf.data());
      kernels::DecompressSection(c->v_format(), c->v(h), vbuf.data());
      for (int64_t t = std::max(cb, begin); t < std::min(ce, end); ++t) {
        const size_t dst = ((t - begin) * heads + h) * row;
        std::memcpy(kd + dst, kbuf.data() + (t - cb) * row, row);
        std::memcpy(vd + dst, vbuf.data() + (t - cb) * row, row);
      }
    }
  }
  for (const auto& b : tail_) {
    for (int r = b->begin; r < b->rows; ++r, ++pos) {
      if (pos < begin || pos >= end) continue;
      for (int h = 0; h < heads; ++h) {
        const size_t dst = ((pos - begin) * heads + h) * row;
        std::memcpy(kd + dst, b->k_row(h, r), row);
        std::memcpy(vd + dst, b->v_row(h, r), row);
      }
    }
  }
}

}  // namespace sparsekv
