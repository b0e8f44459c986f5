#include "core/layer_store.h"

#include <algorithm>
#include <cfloat>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace sparsekv {

LayerStore::LayerStore(const Layout& layout)
    : layout_(layout),
      chunks_(std::make_shared<const ChunkList>()),
      q_energy_(static_cast<size_t>(layout.num_kv_heads) * layout.head_dim, 0.0) {}

int64_t LayerStore::BlockBytes(const Layout& l) {
  const int64_t rows = static_cast<int64_t>(l.num_kv_heads) * DenseBlock::kRows;
  return rows * (2 * l.head_dim * static_cast<int64_t>(kernels::DTypeSize(l.dtype)) +
                 static_cast<int64_t>(sizeof(float))) +
         static_cast<int64_t>(sizeof(DenseBlock));
}

int64_t LayerStore::FixedBytes(const Layout& l) {
  return static_cast<int64_t>(sizeof(LayerStore) + sizeof(ChunkList)) +
         static_cast<int64_t>(l.num_kv_heads) * l.head_dim * static_cast<int64_t>(sizeof(double));
}

int64_t LayerStore::BlocksNeeded(int64_t tokens) const {
  const int64_t room = tail_.empty() ? 0 : DenseBlock::kRows - tail_.back()->rows;
  return tokens <= room ? 0 : (tokens - room + DenseBlock::kRows - 1) / DenseBlock::kRows;
}

int64_t LayerStore::Append(kernels::DType src, const uint8_t* k, const uint8_t* v, int64_t tokens,
                           size_t token_stride, size_t head_stride) {
  const int heads = layout_.num_kv_heads;
  const int d = layout_.head_dim;
  int64_t blocks = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    if (tail_.empty() || tail_.back()->rows == DenseBlock::kRows) {
      tail_.push_back(std::make_shared<DenseBlock>(heads, d, layout_.dtype));
      ++blocks;
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
  return blocks;
}

int64_t LayerStore::AppendStaged(const std::vector<BlockRows>& staged) {
  const int heads = layout_.num_kv_heads;
  const size_t row = static_cast<size_t>(layout_.head_dim) * kernels::DTypeSize(layout_.dtype);
  int64_t blocks = 0;
  for (const BlockRows& r : staged) {
    for (int src = r.begin; src < r.end; ++src) {
      if (tail_.empty() || tail_.back()->rows == DenseBlock::kRows) {
        tail_.push_back(std::make_shared<DenseBlock>(heads, layout_.head_dim, layout_.dtype));
        ++blocks;
      }
      DenseBlock& b = *tail_.back();
      for (int h = 0; h < heads; ++h) {
        std::memcpy(b.k_row(h, b.rows), r.block->k_row(h, src), row);
        std::memcpy(b.v_row(h, b.rows), r.block->v_row(h, src), row);
        b.mass(h)[b.rows] = r.block->mass(h)[src];
      }
      ++b.rows;
      ++tail_tokens_;
    }
  }
  return blocks;
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

void LayerStore::AccumulateQueryEnergy(const Layout& l, const float* q, double* sums) {
  const int d = l.head_dim;
  const int group = l.group_size();
  for (int h = 0; h < l.num_q_heads; ++h) {
    double* e = sums + static_cast<size_t>(h / group) * d;
    for (int j = 0; j < d; ++j) e[j] += static_cast<double>(q[h * d + j]) * q[h * d + j];
  }
}

void LayerStore::AddQueryEnergy(const double* sums) {
  for (size_t i = 0; i < q_energy_.size(); ++i) q_energy_[i] += sums[i];
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
  // Clamped to the float range: scores use its root, which then stays finite.
  in.q_energy.resize(q_energy_.size());
  for (size_t i = 0; i < q_energy_.size(); ++i) {
    in.q_energy[i] = static_cast<float>(std::min<double>(q_energy_[i], FLT_MAX));
  }
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

int64_t LayerStore::Publish(std::shared_ptr<const CompressedChunk> chunk) {
  int left = chunk->tokens();
  int64_t released = 0;
  while (left > 0) {
    DenseBlock& b = *tail_.front();
    const int n = std::min(b.rows - b.begin, left);
    b.begin += n;
    left -= n;
    if (b.begin == DenseBlock::kRows) {
      tail_.pop_front();
      ++released;
    }
  }
  tail_tokens_ -= chunk->tokens();
  AddChunk(std::move(chunk));
  return released;
}

int64_t LayerStore::BlocksReleasedBy(int tokens) const {
  int64_t released = 0;
  int left = tokens;
  for (const auto& b : tail_) {
    if (left <= 0) break;
    const int n = std::min(b->rows - b->begin, left);
    left -= n;
    if (b->begin + n == DenseBlock::kRows) ++released;
  }
  return released;
}

void LayerStore::AddChunk(std::shared_ptr<const CompressedChunk> chunk) {
  const int64_t elems =
      static_cast<int64_t>(chunk->tokens()) * layout_.num_kv_heads * layout_.head_dim;
  k_kept_ += static_cast<int64_t>(elems * chunk->k_format().kept_fraction() + 0.5);
  v_kept_ += static_cast<int64_t>(elems * chunk->v_format().kept_fraction() + 0.5);
  output_aware_k_ += chunk->k_output_aware();
  output_aware_v_ += chunk->v_output_aware();
  compressed_tokens_ += chunk->tokens();
  compressed_bytes_ += static_cast<int64_t>(chunk->bytes());
  auto next = std::make_shared<ChunkList>(*chunks_);
  next->push_back(std::move(chunk));
  chunks_ = std::move(next);
}

absl::Status ValidateSectionFormat(const kernels::SectionFormat& f, const Layout& layout,
                                   const char* what) {
  const int kind = static_cast<int>(f.kind);
  if (kind < 0 || kind > 2) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": unknown section kind ", kind));
  }
  if (f.head_dim != layout.head_dim || f.dtype != layout.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": head_dim ", f.head_dim, " / dtype ", static_cast<int>(f.dtype),
        " do not match the layout's ", layout.head_dim, " / ", static_cast<int>(layout.dtype)));
  }
  if (f.tokens < 1 || f.tokens > 8192 || (f.group != 32 && f.group != 64)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": tokens ", f.tokens, " or group ", f.group, " out of range"));
  }
  if (f.kind == kernels::SectionKind::kPerChannel && f.tokens % f.group != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": per-channel tokens ", f.tokens, " not a multiple of ", f.group));
  }
  if (f.kind != kernels::SectionKind::kDense && (f.k < 1 || f.k > f.n())) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": keeps ", f.k, " of ", f.n(), " elements per vector"));
  }
  return absl::OkStatus();
}

LayerImage LayerStore::Export() const { return FinishExport(layout_, BeginExport()); }

LayerExport LayerStore::BeginExport() const {
  LayerExport e;
  e.snap = Snapshot();
  e.tail_first_row = tail_.empty() ? 0 : tail_.front()->begin;
  const int heads = layout_.num_kv_heads;
  e.tail_mass.resize(static_cast<size_t>(heads) * tail_tokens_);
  int64_t t = 0;
  for (const auto& b : tail_) {
    for (int r = b->begin; r < b->rows; ++r, ++t) {
      for (int h = 0; h < heads; ++h) {
        e.tail_mass[static_cast<size_t>(h) * tail_tokens_ + t] = b->mass(h)[r];
      }
    }
  }
  e.q_energy = q_energy_;
  e.queries_seen = queries_seen_;
  return e;
}

LayerImage LayerStore::FinishExport(const Layout& layout, const LayerExport& e) {
  LayerImage image;
  for (const auto& c : *e.snap.chunks) {
    LayerImage::Chunk ic;
    ic.k_format = c->k_format();
    ic.v_format = c->v_format();
    ic.k_output_aware = c->k_output_aware();
    ic.v_output_aware = c->v_output_aware();
    ic.data.assign(reinterpret_cast<const char*>(c->k(0)), c->bytes());
    image.chunks.push_back(std::move(ic));
  }
  image.tail_tokens = e.snap.tail_tokens;
  image.tail_first_row = e.tail_first_row;
  // [tail_tokens, kv_heads, head_dim] from the blocks' [kv_heads, rows, head_dim].
  const int heads = layout.num_kv_heads;
  const size_t row = static_cast<size_t>(layout.head_dim) * kernels::DTypeSize(layout.dtype);
  image.tail_k.resize(static_cast<size_t>(e.snap.tail_tokens) * heads * row);
  image.tail_v.resize(image.tail_k.size());
  size_t t = 0;
  for (const BlockRows& b : e.snap.tail) {
    for (int r = b.begin; r < b.end; ++r, ++t) {
      for (int h = 0; h < heads; ++h) {
        const size_t dst = (t * heads + h) * row;
        std::memcpy(image.tail_k.data() + dst, b.block->k_row(h, r), row);
        std::memcpy(image.tail_v.data() + dst, b.block->v_row(h, r), row);
      }
    }
  }
  image.tail_mass = e.tail_mass;
  image.q_energy = e.q_energy;
  image.queries_seen = e.queries_seen;
  return image;
}

absl::StatusOr<int64_t> LayerStore::Restore(const LayerImage& image, SlabPoolSet* pools) {
  const int heads = layout_.num_kv_heads;
  const size_t row = static_cast<size_t>(layout_.head_dim) * kernels::DTypeSize(layout_.dtype);
  // Everything is checked before anything is built.
  for (size_t i = 0; i < image.chunks.size(); ++i) {
    const LayerImage::Chunk& c = image.chunks[i];
    const std::string what = absl::StrCat("chunk ", i);
    SPARSEKV_RETURN_IF_ERROR(ValidateSectionFormat(c.k_format, layout_, (what + " K").c_str()));
    SPARSEKV_RETURN_IF_ERROR(ValidateSectionFormat(c.v_format, layout_, (what + " V").c_str()));
    if (c.k_format.tokens != c.v_format.tokens) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": K and V token counts differ"));
    }
    if (c.data.size() != CompressedChunk::Bytes(c.k_format, c.v_format, heads)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has ", c.data.size(), " bytes, its formats need ",
                       CompressedChunk::Bytes(c.k_format, c.v_format, heads)));
    }
    const auto* p = reinterpret_cast<const uint8_t*>(c.data.data());
    for (int h = 0; h < heads; ++h) {
      const uint8_t* k = p + h * (c.k_format.bytes() + c.v_format.bytes());
      if (!kernels::SectionBitmapsValid(c.k_format, k) ||
          !kernels::SectionBitmapsValid(c.v_format, k + c.k_format.bytes())) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ", KV head ", h, ": a bitmap does not keep exactly k elements"));
      }
    }
  }
  const size_t tail_bytes = static_cast<size_t>(image.tail_tokens) * heads * row;
  if (image.tail_tokens < 0 || image.tail_k.size() != tail_bytes ||
      image.tail_v.size() != tail_bytes ||
      image.tail_mass.size() != static_cast<size_t>(heads) * image.tail_tokens) {
    return absl::InvalidArgumentError("dense tail sizes do not match its token count");
  }
  if (image.q_energy.size() != q_energy_.size()) {
    return absl::InvalidArgumentError("query statistics have the wrong size");
  }
  if (image.tail_first_row < 0 || image.tail_first_row >= DenseBlock::kRows) {
    return absl::InvalidArgumentError("tail_first_row out of range");
  }
  for (const LayerImage::Chunk& c : image.chunks) {
    auto chunk = std::make_shared<CompressedChunk>(
        c.k_format, c.v_format, heads,
        pools->Get(CompressedChunk::Bytes(c.k_format, c.v_format, heads)), c.k_output_aware,
        c.v_output_aware);
    std::memcpy(chunk->mutable_k(0), c.data.data(), c.data.size());
    AddChunk(std::move(chunk));
  }
  const size_t token_stride = static_cast<size_t>(heads) * row;
  int64_t blocks = 0;
  if (image.tail_first_row > 0) {
    auto first = std::make_shared<DenseBlock>(heads, layout_.head_dim, layout_.dtype);
    first->begin = first->rows = image.tail_first_row;
    tail_.push_back(std::move(first));
    blocks = 1;
  }
  blocks += Append(layout_.dtype, reinterpret_cast<const uint8_t*>(image.tail_k.data()),
                   reinterpret_cast<const uint8_t*>(image.tail_v.data()), image.tail_tokens,
                   token_stride, row);
  int64_t t = 0;
  for (const auto& b : tail_) {
    for (int r = b->begin; r < b->rows; ++r, ++t) {
      for (int h = 0; h < heads; ++h) {
        b->mass(h)[r] = image.tail_mass[static_cast<size_t>(h) * image.tail_tokens + t];
      }
    }
  }
  q_energy_ = image.q_energy;
  queries_seen_ = image.queries_seen;
  return blocks;
}

int64_t LayerStore::chunk_memory_bytes() const {
  int64_t total = 0;
  for (const auto& c : *chunks_) total += static_cast<int64_t>(c->memory_bytes());
  return total;
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
