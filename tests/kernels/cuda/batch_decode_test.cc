// GPU test of kernels/cuda/batch_decode.h against the float64 CPU reference
// (kernels::ReferenceDecodeAttention), on fresh random inputs:
//   dtype fp16/bf16 x head_dim 64/128/256 x GQA group 1/4/8 x sparsity 0/0.5/0.7, each a
//   ragged batch of 10 items: lengths 1, 3, 9, 27, 81, 129, 257, 1000, 4097 and an empty item;
//   every item mixes segment layouts (per-token chunks, per-channel chunks, K and V of different
//   kinds, dense chunks, chunks of several formats and sizes not a multiple of 16, dense tails
//   in 32-row blocks). Compressed bytes come from the CPU compressor (CompressSection), so the
//   kernel reads the real format.
// Each batch runs under two plans (the device's SM count, and 2 SMs so that blocks run many
// units), twice each: the two runs of a plan must be bitwise equal (the split-KV merge order is
// fixed), every output element must be written (outputs are NaN-poisoned first) and within
// tolerance of the reference, and the merge counters must be back to zero. Sparsity 0 batches
// (all dense) also run BatchDecodeDense.
//
// Tolerance. Both sides read the same fp16/bf16 K/V values exactly; the reference then works in
// float64. The kernel multiplies in fp32 on the tensor cores, after splitting the query and the
// probabilities into a storage-dtype high and low part (x = hi + lo): fp16 keeps 22 bits of x
// (error <= 2^-22 relative), bf16 16 bits (<= 2^-17 = 7.6e-6). A relative error e in q is an
// error of about e * |s| in a score s (|s| <= ~4 here in nats), so e * 4 in each probability;
// the output is a convex combination of V rows, so its error relative to max |V| is of that
// order too: ~5e-7 for fp16, ~3e-5 for bf16, plus fp32 rounding of the running sums over up to
// 256 tiles and their rescalings (~1e-6 typical, ~1.5e-5 worst case). Rounding q to 16 bits
// instead would cost ~2e-3 (fp16) and ~1.6e-2 (bf16). Limits: max |out - ref| / max |V| <= 3e-5
// (fp16), 3e-4 (bf16); |lse - ref| <= 3x that (lse ~ 10 carries fp32's own 1e-6).
//
// Exit codes: 0 all passed, 1 a failure, 77 no usable CUDA device (ctest SKIP_RETURN_CODE).
// --quick: a few small batches (for compute-sanitizer).
#include "kernels/cuda/batch_decode.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/compressed_format.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/dtype.h"

namespace sparsekv::kernels::cuda {
namespace {

constexpr int kSkip = 77;

struct SegSpec {
  SectionKind k_kind, v_kind;
  int tokens;
  int group;  // per-channel G
};

// Segment layouts of one item of `len` tokens; `layout` picks one of several (see below).
std::vector<SegSpec> Layout(int layout, int len) {
  std::vector<SegSpec> out;
  auto chunks = [&](SectionKind k, SectionKind v, int chunk, int group, int keep_tail) {
    int n = (len - keep_tail) / chunk;
    if (n < 0) n = 0;
    for (int i = 0; i < n; ++i) out.push_back({k, v, chunk, group});
    return n * chunk;
  };
  auto tail = [&](int done) {  // dense tail in 32-row blocks, the first one partial
    int rest = len - done;
    int first = rest % 32;
    if (first) out.push_back({SectionKind::kDense, SectionKind::kDense, first, 32});
    for (int r = first; r < rest; r += 32) {
      out.push_back({SectionKind::kDense, SectionKind::kDense, 32, 32});
    }
  };
  const SectionKind T = SectionKind::kPerToken, C = SectionKind::kPerChannel,
                    D = SectionKind::kDense;
  switch (layout) {
    case 0:  // the server's default: per-token chunks of 256, dense window of 32
      tail(chunks(T, T, 256, 32, 32));
      break;
    case 1:  // per-token chunks covering everything they can, no tail minimum
      tail(chunks(T, T, 256, 32, 0));
      break;
    case 2:  // per-channel K and V, G = 32
      tail(chunks(C, C, 256, 32, 32));
      break;
    case 3:  // K per-token, V per-channel (G = 64), chunks of 128
      tail(chunks(T, C, 128, 64, 0));
      break;
    case 4:  // K per-channel (G = 32), V per-token, chunks of 64
      tail(chunks(C, T, 64, 32, 32));
      break;
    case 5:  // dense K, per-token V, chunks of 48 (not a multiple of 16)
      tail(chunks(D, T, 48, 32, 0));
      break;
    case 6: {  // several formats and sizes in one item: per-token 40, per-channel 64, per-token
               // 20 (a flush remainder), then the tail
      int done = 0;
      while (len - done >= 124) {
        out.push_back({T, T, 40, 32});
        out.push_back({C, C, 64, 32});
        out.push_back({T, T, 20, 32});
        done += 124;
      }
      tail(done);
      break;
    }
    default:  // all dense
      tail(0);
      break;
  }
  return out;
}
constexpr int kLayouts = 8;

struct Case {
  DType dtype;
  int head_dim;
  int group;
  double sparsity;
};

struct Stats {
  int batches = 0, heads_checked = 0, failures = 0;
  double max_err[2] = {0, 0};  // by dtype (0 fp16, 1 bf16): output, normalised
  double max_lse_err[2] = {0, 0};
};

uint16_t ToStorage(DType t, float x) {
  return t == DType::kFloat16 ? FloatToHalf(x) : FloatToBFloat16(x);
}

// Host copy of one batch and its reference outputs.
struct Batch {
  BatchDecodeShape shape;
  std::vector<DecodeItem> items;          // host pointers replaced by device ones at upload
  std::vector<DecodeSegment> segments;    // global
  std::vector<SectionFormat> kfmt, vfmt;  // per segment
  // [segment][head] section bytes
  std::vector<std::vector<std::vector<uint8_t>>> ksec, vsec;
  std::vector<std::vector<float>> q;    // per item [H*group, D]
  std::vector<std::vector<float>> ref;  // per item [H*group, D]
  std::vector<std::vector<float>> ref_lse;
  std::vector<float> max_v;  // per item
  int64_t tokens = 0;
};

Batch MakeBatch(const Case& c, const std::vector<int>& lengths, int layout_seed,
                std::mt19937_64& rng) {
  Batch b;
  b.shape = {2, c.group, c.head_dim, c.dtype};
  const int H = b.shape.num_kv_heads, d = c.head_dim, qh = H * c.group;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int len = lengths[i];
    DecodeItem item;
    item.segment_begin = static_cast<int>(b.segments.size());
    item.scale = (0.5f + 1.5f * uni(rng)) / std::sqrt(static_cast<float>(d));
    const int layout = static_cast<int>((i + layout_seed) % kLayouts);
    const std::vector<SegSpec> specs = len > 0 ? Layout(layout, len) : std::vector<SegSpec>{};
    // Random rows per head, in the storage dtype; V rows get a per-item offset so outputs are
    // not all near zero.
    std::vector<std::vector<uint16_t>> krows(H), vrows(H);
    const float koff = normal(rng), voff = normal(rng);
    float max_v = 0.0f;
    for (int h = 0; h < H; ++h) {
      krows[h].resize(static_cast<size_t>(len) * d);
      vrows[h].resize(static_cast<size_t>(len) * d);
      for (auto& x : krows[h]) x = ToStorage(c.dtype, 0.3f * koff + normal(rng));
      for (auto& x : vrows[h]) {
        x = ToStorage(c.dtype, voff + normal(rng));
        max_v = std::max(max_v, std::fabs(LoadAsFloat(c.dtype, &x, 0)));
      }
    }
    b.max_v.push_back(max_v);
    std::vector<float> zero_mid(d, 1.0f), zero_last(d, 1.0f);
    for (int j = 32; j < 64; ++j) zero_mid[j] = 0.0f;
    for (int j = d - 32; j < d; ++j) zero_last[j] = 0.0f;
    int row = 0;
    for (const SegSpec& s : specs) {
      SectionFormat kf = MakeSectionFormat(s.k_kind, c.sparsity, d, s.tokens, s.group, c.dtype);
      SectionFormat vf = MakeSectionFormat(s.v_kind, c.sparsity, d, s.tokens, s.group, c.dtype);
      DecodeSegment seg;
      seg.tokens = s.tokens;
      seg.k_kind = static_cast<uint8_t>(kf.kind);
      seg.v_kind = static_cast<uint8_t>(vf.kind);
      seg.group = static_cast<uint16_t>(s.group);
      seg.k_keep = static_cast<uint16_t>(kf.k);
      seg.v_keep = static_cast<uint16_t>(vf.k);
      b.segments.push_back(seg);
      b.kfmt.push_back(kf);
      b.vfmt.push_back(vf);
      std::vector<std::vector<uint8_t>> ks(H), vs(H);
      for (int h = 0; h < H; ++h) {
        ks[h].resize(kf.bytes());
        vs[h].resize(vf.bytes());
        // KV head 1 of two items in three prunes with channel weights that are zero on one
        // 32-channel word, so its per-token rows keep nothing there: the middle word [32, 64)
        // (the scatter expansion falls back to the slot expansion) or the last word (scatter).
        const float* cw = nullptr;
        if (h == 1 && i % 3 != 0) cw = (i % 3 == 1 ? zero_mid : zero_last).data();
        CompressSection(kf, krows[h].data() + static_cast<size_t>(row) * d, nullptr, cw,
                        ks[h].data());
        CompressSection(vf, vrows[h].data() + static_cast<size_t>(row) * d, nullptr, cw,
                        vs[h].data());
      }
      b.ksec.push_back(std::move(ks));
      b.vsec.push_back(std::move(vs));
      row += s.tokens;
    }
    item.num_segments = static_cast<int>(b.segments.size()) - item.segment_begin;
    b.items.push_back(item);
    b.tokens += len;

    // Query: normal times a per-item magnitude from 1e-5 to 1e5 (beyond fp16's range at both
    // ends: the kernel normalises each head by a power of two), with the scale divided by it so
    // that scores stay O(1).
    std::vector<float> q(static_cast<size_t>(qh) * d);
    const float mags[5] = {1e-5f, 1e-2f, 1.0f, 1e2f, 1e5f};
    const float mag = mags[i % 5];
    for (auto& x : q) x = normal(rng) * mag;
    b.items.back().scale = item.scale / mag;
    b.q.push_back(q);

    // Reference per KV head.
    std::vector<float> ref(static_cast<size_t>(qh) * d), lse(qh);
    for (int h = 0; h < H; ++h) {
      DecodeAttentionParams p;
      p.q = q.data() + static_cast<size_t>(h) * c.group * d;
      p.group = c.group;
      p.head_dim = d;
      p.dtype = c.dtype;
      p.scale = b.items.back().scale;
      p.out = ref.data() + static_cast<size_t>(h) * c.group * d;
      p.lse = lse.data() + static_cast<size_t>(h) * c.group;
      // Uniform-format chunks go to the reference as chunks, dense segments as spans; an item
      // with chunks of several formats is decompressed into one span (the reference takes one
      // format per call).
      std::vector<ChunkRef> chunks;
      std::vector<DenseSpan> spans;
      bool uniform = true;
      int first_chunk = -1;
      for (int s = item.segment_begin; s < item.segment_begin + item.num_segments; ++s) {
        if (b.kfmt[s].kind == SectionKind::kDense && b.vfmt[s].kind == SectionKind::kDense) {
          continue;  // a span
        }
        const SectionFormat &kf = b.kfmt[s], &vf = b.vfmt[s];
        if (first_chunk < 0) {
          first_chunk = s;
          continue;
        }
        const SectionFormat &k0 = b.kfmt[first_chunk], &v0 = b.vfmt[first_chunk];
        if (kf.kind != k0.kind || vf.kind != v0.kind || kf.tokens != k0.tokens || kf.k != k0.k ||
            vf.k != v0.k || kf.group != k0.group) {
          uniform = false;
        }
      }
      std::vector<uint8_t> kcat, vcat;
      if (uniform) {
        for (int s = item.segment_begin; s < item.segment_begin + item.num_segments; ++s) {
          const bool dense =
              b.kfmt[s].kind == SectionKind::kDense && b.vfmt[s].kind == SectionKind::kDense;
          if (dense) {
            spans.push_back({b.ksec[s][h].data(), b.vsec[s][h].data(), b.segments[s].tokens});
          } else {
            chunks.push_back({b.ksec[s][h].data(), b.vsec[s][h].data()});
          }
        }
        if (first_chunk >= 0) {
          p.k_format = b.kfmt[first_chunk];
          p.v_format = b.vfmt[first_chunk];
        }
      } else {
        const size_t es = DTypeSize(c.dtype);
        kcat.resize(static_cast<size_t>(len) * d * es);
        vcat.resize(kcat.size());
        size_t off = 0;
        for (int s = item.segment_begin; s < item.segment_begin + item.num_segments; ++s) {
          DecompressSection(b.kfmt[s], b.ksec[s][h].data(), kcat.data() + off);
          DecompressSection(b.vfmt[s], b.vsec[s][h].data(), vcat.data() + off);
          off += static_cast<size_t>(b.segments[s].tokens) * d * es;
        }
        spans.push_back({kcat.data(), vcat.data(), len});
      }
      p.chunks = chunks.data();
      p.num_chunks = static_cast<int>(chunks.size());
      p.spans = spans.data();
      p.num_spans = static_cast<int>(spans.size());
      ReferenceDecodeAttention(p);
    }
    b.ref.push_back(ref);
    b.ref_lse.push_back(lse);
  }
  return b;
}

// Device copy of a batch.
struct DeviceBatch {
  uint8_t* arena = nullptr;
  const void** kptr = nullptr;
  const void** vptr = nullptr;
  DecodeItem* items = nullptr;
  DecodeSegment* segments = nullptr;
  std::vector<float*> q, out, lse;
  ~DeviceBatch() {
    cudaFree(arena);
    cudaFree(kptr);
    cudaFree(vptr);
    cudaFree(items);
    cudaFree(segments);
    for (float* x : q) cudaFree(x);
    for (float* x : out) cudaFree(x);
    for (float* x : lse) cudaFree(x);
  }
};

void Upload(const Batch& b, DeviceBatch* db, std::vector<DecodeItem>* dev_items) {
  const int H = b.shape.num_kv_heads, d = b.shape.head_dim, qh = H * b.shape.group;
  // Sections packed at 16-byte offsets (the kernels' alignment contract, and no more).
  std::vector<size_t> koff, voff;
  size_t total = 0;
  auto place = [&](size_t n) {
    const size_t at = total;
    total += (n + 15) & ~size_t{15};
    return at;
  };
  for (size_t s = 0; s < b.segments.size(); ++s) {
    for (int h = 0; h < H; ++h) {
      koff.push_back(place(b.ksec[s][h].size()));
      voff.push_back(place(b.vsec[s][h].size()));
    }
  }
  std::vector<uint8_t> host(std::max<size_t>(total, 16), 0);
  std::vector<const void*> kp, vp;
  CUDA_OK(cudaMalloc(&db->arena, host.size()));
  for (size_t s = 0, i = 0; s < b.segments.size(); ++s) {
    for (int h = 0; h < H; ++h, ++i) {
      std::memcpy(host.data() + koff[i], b.ksec[s][h].data(), b.ksec[s][h].size());
      std::memcpy(host.data() + voff[i], b.vsec[s][h].data(), b.vsec[s][h].size());
      kp.push_back(db->arena + koff[i]);
      vp.push_back(db->arena + voff[i]);
    }
  }
  CUDA_OK(cudaMemcpy(db->arena, host.data(), host.size(), cudaMemcpyHostToDevice));
  const size_t np = std::max<size_t>(kp.size(), 1);
  CUDA_OK(cudaMalloc(&db->kptr, np * sizeof(void*)));
  CUDA_OK(cudaMalloc(&db->vptr, np * sizeof(void*)));
  if (!kp.empty()) {
    CUDA_OK(cudaMemcpy(db->kptr, kp.data(), kp.size() * sizeof(void*), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(db->vptr, vp.data(), vp.size() * sizeof(void*), cudaMemcpyHostToDevice));
  }
  *dev_items = b.items;
  for (size_t i = 0; i < b.items.size(); ++i) {
    float *q, *out, *lse;
    CUDA_OK(cudaMalloc(&q, sizeof(float) * qh * d));
    CUDA_OK(cudaMalloc(&out, sizeof(float) * qh * d));
    CUDA_OK(cudaMalloc(&lse, sizeof(float) * qh));
    CUDA_OK(cudaMemcpy(q, b.q[i].data(), sizeof(float) * qh * d, cudaMemcpyHostToDevice));
    db->q.push_back(q);
    db->out.push_back(out);
    db->lse.push_back(lse);
    (*dev_items)[i].q = q;
    (*dev_items)[i].out = out;
    // Every third item asks for no lse.
    (*dev_items)[i].lse = i % 3 == 2 ? nullptr : lse;
  }
}

struct Result {
  std::vector<std::vector<float>> out, lse;
};

// Plans (on the host copy of the segments), uploads and runs one launch; returns outputs.
Result Run(const Batch& b, DeviceBatch& db, const std::vector<DecodeItem>& dev_items,
           bool dense_kernel, int num_sms, int scatter_max_keep = 0) {
  const int H = b.shape.num_kv_heads, d = b.shape.head_dim, qh = H * b.shape.group;
  std::vector<DecodeSegment> segs = b.segments;
  BatchDecodePlan plan;
  CUDA_OK(PlanBatchDecode(b.shape, dense_kernel, dev_items.data(),
                          static_cast<int>(dev_items.size()), segs.data(),
                          static_cast<int>(segs.size()), num_sms, &plan));
  DecodeItem* items = nullptr;
  DecodeSegment* dsegs = nullptr;
  DecodeWorkUnit* units = nullptr;
  int32_t* block_units = nullptr;
  float *pout = nullptr, *plse = nullptr;
  int32_t* counters = nullptr;
  CUDA_OK(cudaMalloc(&items, sizeof(DecodeItem) * std::max<size_t>(1, dev_items.size())));
  CUDA_OK(cudaMalloc(&dsegs, sizeof(DecodeSegment) * std::max<size_t>(1, segs.size())));
  CUDA_OK(cudaMalloc(&units, sizeof(DecodeWorkUnit) * plan.units.size()));
  CUDA_OK(cudaMalloc(&block_units, sizeof(int32_t) * plan.block_units.size()));
  CUDA_OK(cudaMalloc(&pout, sizeof(float) * std::max<size_t>(1, plan.partial_out_floats(b.shape))));
  CUDA_OK(cudaMalloc(&plse, sizeof(float) * std::max<size_t>(1, plan.partial_lse_floats(b.shape))));
  const size_t ncount = std::max<size_t>(1, dev_items.size() * H);
  CUDA_OK(cudaMalloc(&counters, sizeof(int32_t) * ncount));
  CUDA_OK(cudaMemset(counters, 0, sizeof(int32_t) * ncount));
  CUDA_OK(cudaMemcpy(items, dev_items.data(), sizeof(DecodeItem) * dev_items.size(),
                     cudaMemcpyHostToDevice));
  if (!segs.empty()) {
    CUDA_OK(cudaMemcpy(dsegs, segs.data(), sizeof(DecodeSegment) * segs.size(),
                       cudaMemcpyHostToDevice));
  }
  CUDA_OK(cudaMemcpy(units, plan.units.data(), sizeof(DecodeWorkUnit) * plan.units.size(),
                     cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(block_units, plan.block_units.data(),
                     sizeof(int32_t) * plan.block_units.size(), cudaMemcpyHostToDevice));
  BatchDecodeParams p;
  p.shape = b.shape;
  p.items = items;
  p.segments = dsegs;
  p.k_sections = db.kptr;
  p.v_sections = db.vptr;
  p.units = units;
  p.block_units = block_units;
  p.partial_out = pout;
  p.partial_lse = plse;
  p.counters = counters;
  p.num_items = static_cast<int>(dev_items.size());
  p.num_segments = static_cast<int>(segs.size());
  p.num_units = static_cast<int>(plan.units.size());
  p.num_blocks = plan.num_blocks;
  p.stage_bytes = plan.stage_bytes;
  p.smem_bytes = plan.smem_bytes;
  p.scatter_max_keep = scatter_max_keep;
  Result r;
  for (int rep = 0; rep < 2; ++rep) {
    for (size_t i = 0; i < dev_items.size(); ++i) {  // poison: NaN
      CUDA_OK(cudaMemset(db.out[i], 0xff, sizeof(float) * qh * d));
      CUDA_OK(cudaMemset(db.lse[i], 0xff, sizeof(float) * qh));
    }
    CUDA_OK(dense_kernel ? BatchDecodeDense(p, nullptr) : BatchDecode(p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    Result cur;
    for (size_t i = 0; i < dev_items.size(); ++i) {
      std::vector<float> o(static_cast<size_t>(qh) * d), l(qh);
      CUDA_OK(cudaMemcpy(o.data(), db.out[i], sizeof(float) * o.size(), cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(l.data(), db.lse[i], sizeof(float) * l.size(), cudaMemcpyDeviceToHost));
      cur.out.push_back(o);
      cur.lse.push_back(l);
    }
    if (rep == 0) {
      r = cur;
    } else {
      // The merge order is fixed by the plan, not by which block finishes first.
      for (size_t i = 0; i < dev_items.size(); ++i) {
        if (std::memcmp(cur.out[i].data(), r.out[i].data(), sizeof(float) * cur.out[i].size()) ||
            std::memcmp(cur.lse[i].data(), r.lse[i].data(), sizeof(float) * cur.lse[i].size())) {
          std::fprintf(stderr, "FAIL: item %zu differs between two identical launches\n", i);
          std::exit(1);
        }
      }
    }
  }
  int32_t left[1] = {0};
  std::vector<int32_t> cnt(ncount);
  CUDA_OK(cudaMemcpy(cnt.data(), counters, sizeof(int32_t) * ncount, cudaMemcpyDeviceToHost));
  for (int32_t x : cnt) left[0] |= x;
  if (left[0] != 0) {
    std::fprintf(stderr, "FAIL: merge counters not reset after the launch\n");
    std::exit(1);
  }
  cudaFree(items);
  cudaFree(dsegs);
  cudaFree(units);
  cudaFree(block_units);
  cudaFree(pout);
  cudaFree(plse);
  cudaFree(counters);
  return r;
}

void Check(const Case& c, const Batch& b, const std::vector<DecodeItem>& dev_items, const Result& r,
           const char* what, Stats* st) {
  const int d = c.head_dim, qh = b.shape.num_kv_heads * c.group;
  const int dt = c.dtype == DType::kBFloat16 ? 1 : 0;
  const double tol = dt ? 3e-4 : 3e-5;
  for (size_t i = 0; i < b.items.size(); ++i) {
    const double norm = std::max(1e-30, static_cast<double>(b.max_v[i]));
    for (int h = 0; h < qh; ++h) {
      double err = 0.0;
      bool bad = false;
      for (int j = 0; j < d; ++j) {
        const float got = r.out[i][static_cast<size_t>(h) * d + j];
        const float want = b.ref[i][static_cast<size_t>(h) * d + j];
        if (!std::isfinite(got)) bad = true;
        err = std::max(err, std::fabs(static_cast<double>(got) - want) / norm);
      }
      double lse_err = 0.0;
      if (dev_items[i].lse != nullptr) {
        const float got = r.lse[i][h], want = b.ref_lse[i][h];
        if (std::isinf(want)) {
          if (!(std::isinf(got) && got < 0)) bad = true;
        } else {
          if (!std::isfinite(got)) bad = true;
          lse_err = std::fabs(static_cast<double>(got) - want);
        }
      }
      ++st->heads_checked;
      st->max_err[dt] = std::max(st->max_err[dt], err);
      st->max_lse_err[dt] = std::max(st->max_lse_err[dt], lse_err);
      if (bad || err > tol || lse_err > 3 * tol) {
        ++st->failures;
        if (st->failures <= 20) {
          std::fprintf(stderr,
                       "FAIL %s: %s d=%d group=%d sparsity=%.1f item %zu (%d segments) q head %d: "
                       "out err %.3g, lse err %.3g (got %g want %g)%s\n",
                       what, DTypeName(c.dtype), d, c.group, c.sparsity, i, b.items[i].num_segments,
                       h, err, lse_err, r.lse[i][h], b.ref_lse[i][h],
                       bad ? ", non-finite or unwritten" : "");
        }
      }
    }
  }
}

bool HaveDevice() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    std::printf("SKIP: no usable CUDA device (%s)\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return false;
  }
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major < 9) {
    std::printf("SKIP: needs compute capability 9.0 (sm_90 build)\n");
    return false;
  }
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  return true;
}

int Main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) quick |= std::strcmp(argv[i], "--quick") == 0;
  if (!HaveDevice()) return kSkip;

  std::vector<Case> cases;
  std::vector<int> ladder = {1, 3, 9, 27, 81, 129, 257, 1000, 4097, 0};
  if (quick) {
    cases = {{DType::kFloat16, 128, 4, 0.7},
             {DType::kBFloat16, 64, 8, 0.5},
             {DType::kFloat16, 256, 1, 0.0},
             {DType::kBFloat16, 128, 4, 0.0}};
    ladder = {1, 9, 27, 129, 300, 0};
  } else {
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
      for (int d : {64, 128, 256}) {
        for (int g : {1, 4, 8}) {
          for (double s : {0.0, 0.5, 0.7}) cases.push_back({dt, d, g, s});
        }
      }
    }
  }
  int sms = 0;
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937_64 rng(20261204);
  Stats st;
  int seed = 0;
  for (const Case& c : cases) {
    // Shuffle the ladder so that items of every length meet every layout across cases.
    std::vector<int> lengths = ladder;
    std::shuffle(lengths.begin(), lengths.end(), rng);
    const Batch b = MakeBatch(c, lengths, seed++, rng);
    DeviceBatch db;
    std::vector<DecodeItem> dev_items;
    Upload(b, &db, &dev_items);
    // Both expansions of per-token steps: slot by slot (0) and by scatter (256: every keep).
    for (int scatter : {0, 256}) {
      for (int plan_sms : {sms, 2}) {
        const Result r = Run(b, db, dev_items, false, plan_sms, scatter);
        Check(c, b, dev_items, r,
              scatter ? (plan_sms == 2 ? "BatchDecode(scatter, 2 SMs)" : "BatchDecode(scatter)")
                      : (plan_sms == 2 ? "BatchDecode(2 SMs)" : "BatchDecode"),
              &st);
        ++st.batches;
      }
    }
    bool all_dense = true;
    for (const DecodeSegment& s : b.segments) {
      all_dense &= s.k_kind == 0 && s.v_kind == 0;
    }
    if (all_dense) {
      for (int plan_sms : {sms, 2}) {
        const Result r = Run(b, db, dev_items, true, plan_sms);
        Check(c, b, dev_items, r, "BatchDecodeDense", &st);
        ++st.batches;
      }
    }
  }
  std::printf(
      "batch_decode_test: %d launches configs x 2 runs, %d (item, query head) outputs "
      "checked, %d failures\n",
      st.batches, st.heads_checked, st.failures);
  std::printf(
      "max error (|out - ref| / max|V|): fp16 %.3g, bf16 %.3g; max |lse - ref|: fp16 "
      "%.3g, bf16 %.3g\n",
      st.max_err[0], st.max_err[1], st.max_lse_err[0], st.max_lse_err[1]);
  if (st.failures) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("PASSED\n");
  return 0;
}

}  // namespace
}  // namespace sparsekv::kernels::cuda

int main(int argc, char** argv) { return sparsekv::kernels::cuda::Main(argc, argv); }
