// GPU decode attention benchmark (kernels/cuda/batch_decode.h) on issue #13's shapes: GQA 32/8,
// a batch of (session, layer) items of one context length each, laid out as the server stores
// them: chunks of 256 tokens (per-token compressed K and V at sparsity 0.5 / 0.7, or dense
// chunks for the dense rows) and the newest rows in a dense tail of 32-row blocks
// (context - 32 rounded down to chunks; 32..287 tail rows).
//
// Per shape and mode it reports the median of --iters launches timed one by one with CUDA
// events (after --warmup launches; each behind a 30 us GPU spin so that the host's launch latency
// stays out of the interval), rotating over enough copies of the inputs (distinct data)
// that each mode reads >= 240 MB between reuses (L2 is 60 MB), the bytes of K and V read
// (bitmaps + values + dense rows) and the effective bandwidth on them. Modes:
//   dense   BatchDecodeDense on all-dense items (the project's dense baseline)
//   s0.5    BatchDecode, per-token chunks at sparsity 0.5 + dense tail
//   s0.7    the same at 0.7
// Output: a markdown table on stdout and, with --json FILE, one JSON object per row (merged
// with the PyTorch SDPA baseline by report.py).
//
// --shapes issue (default; the issue's list) | smoke (tiny, for ctest); --only and --modes pick
// one shape and some modes (for profiling). Exit 77 without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kernels/compressed_format.h"
#include "kernels/cuda/batch_decode.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/dtype.h"
#include "tests/bench/cuda/bench_util.cuh"

namespace sparsekv::bench {
namespace {

using kernels::DType;
using kernels::SectionFormat;
using kernels::SectionKind;
namespace kc = kernels::cuda;

struct Shape {
  int batch;
  int context;
  int head_dim;
  DType dtype;
};

constexpr int kKvHeads = 8;
constexpr int kGroup = 4;  // 32 query heads
constexpr int kChunk = 256;
constexpr int kWindow = 32;
constexpr double kL2Bytes = 60e6;

// Normal-ish random values (sum of 4 uniforms), fast enough for gigabytes.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull) {}
  uint64_t Next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545f4914f6cdd1dull;
  }
  float Normal() {
    const uint64_t r = Next();
    const float u =
        static_cast<float>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48)) /
        65536.0f;
    return (u - 2.0f) * 1.7320508f;
  }
};

// One mode's inputs for one copy of the batch, on the device.
struct DeviceSet {
  uint8_t* arena = nullptr;
  void** table = nullptr;  // k pointers then v pointers
  kc::DecodeItem* items = nullptr;
  kc::DecodeSegment* segments = nullptr;
  kc::DecodeWorkUnit* units = nullptr;
  int32_t* block_units = nullptr;
  float* partial = nullptr;
  int32_t* counters = nullptr;
  kc::BatchDecodeParams params;
  int64_t bytes = 0;
};

void FreeSet(DeviceSet* s) {
  cudaFree(s->arena);
  cudaFree(s->table);
  cudaFree(s->items);
  cudaFree(s->segments);
  cudaFree(s->units);
  cudaFree(s->block_units);
  cudaFree(s->partial);
  cudaFree(s->counters);
}

struct Mode {
  const char* name;
  double sparsity;  // 0: dense chunks and the dense kernel
};

// Segments of one item: chunks then the dense tail in 32-row blocks.
std::vector<kc::DecodeSegment> ItemSegments(int context, double sparsity, int head_dim) {
  std::vector<kc::DecodeSegment> segs;
  const int chunks = context > kWindow ? (context - kWindow) / kChunk : 0;
  const SectionFormat f = kernels::MakeSectionFormat(SectionKind::kPerToken, sparsity, head_dim,
                                                     kChunk, 32, DType::kFloat16);
  for (int c = 0; c < chunks; ++c) {
    kc::DecodeSegment s;
    s.tokens = kChunk;
    s.k_kind = s.v_kind = static_cast<uint8_t>(f.kind);
    s.k_keep = s.v_keep = static_cast<uint16_t>(f.k);
    segs.push_back(s);
  }
  int rest = context - chunks * kChunk;
  const int first = rest % 32;
  if (first) {
    kc::DecodeSegment s;
    s.tokens = first;
    segs.push_back(s);
  }
  for (int r = first; r < rest; r += 32) {
    kc::DecodeSegment s;
    s.tokens = 32;
    segs.push_back(s);
  }
  return segs;
}

size_t SegBytes(const kc::DecodeSegment& s, int head_dim) {
  return kc::DecodeSectionBytes(static_cast<SectionKind>(s.k_kind), head_dim, s.tokens, s.group,
                                s.k_keep);
}

// Builds `sets` copies of the batch for every mode in one pass over random rows (each chunk's
// rows are generated once and compressed for every mode), uploads them and plans them.
std::vector<std::vector<DeviceSet>> BuildSets(const Shape& sh, const std::vector<Mode>& modes,
                                              int sets, int num_sms,
                                              std::vector<float*>* q_out_buffers) {
  const int d = sh.head_dim;
  const kc::BatchDecodeShape bshape{kKvHeads, kGroup, d, sh.dtype};
  const int nm = static_cast<int>(modes.size());
  std::vector<std::vector<kc::DecodeSegment>> item_segs(nm);
  std::vector<std::vector<size_t>> seg_off(nm);  // byte offset of each segment's K of head 0
  std::vector<size_t> set_bytes(nm);
  for (int m = 0; m < nm; ++m) {
    item_segs[m] = ItemSegments(sh.context, modes[m].sparsity, d);
    size_t off = 0;
    for (const auto& s : item_segs[m]) {
      seg_off[m].push_back(off);
      off += 2 * kKvHeads * ((SegBytes(s, d) + 15) & ~size_t{15});  // K and V per head
    }
    set_bytes[m] = off * sh.batch;
  }
  const int segs_per_item = static_cast<int>(item_segs[0].size());
  // Query/output buffers (shared by all sets and modes: they are tiny).
  const int qh = kKvHeads * kGroup;
  float *q, *out, *lse;
  CUDA_OK(cudaMalloc(&q, sizeof(float) * sh.batch * qh * d));
  CUDA_OK(cudaMalloc(&out, sizeof(float) * sh.batch * qh * d));
  CUDA_OK(cudaMalloc(&lse, sizeof(float) * sh.batch * qh));
  {
    std::vector<float> hq(static_cast<size_t>(sh.batch) * qh * d);
    Rng r(7);
    for (auto& x : hq) x = r.Normal();
    CUDA_OK(cudaMemcpy(q, hq.data(), sizeof(float) * hq.size(), cudaMemcpyHostToDevice));
  }
  q_out_buffers->insert(q_out_buffers->end(), {q, out, lse});

  std::vector<std::vector<DeviceSet>> result(nm, std::vector<DeviceSet>(sets));
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  for (int set = 0; set < sets; ++set) {
    std::vector<std::vector<uint8_t>> host(nm);
    for (int m = 0; m < nm; ++m) host[m].assign(set_bytes[m], 0);
    // Work item: (item, head, segment index). Rows of a segment are generated once.
    const int64_t tasks = static_cast<int64_t>(sh.batch) * kKvHeads * segs_per_item;
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < threads; ++w) {
      pool.emplace_back([&, w]() {
        std::vector<uint16_t> k(static_cast<size_t>(kChunk) * d), v(k.size());
        for (int64_t t = w; t < tasks; t += threads) {
          const int item = static_cast<int>(t / (kKvHeads * segs_per_item));
          const int head = static_cast<int>((t / segs_per_item) % kKvHeads);
          const int si = static_cast<int>(t % segs_per_item);
          Rng rng(static_cast<uint64_t>(set) * 1000003ull + static_cast<uint64_t>(t) + 1);
          const int rows = item_segs[0][si].tokens;
          for (size_t i = 0; i < static_cast<size_t>(rows) * d; ++i) {
            const float a = rng.Normal(), b = rng.Normal();
            k[i] =
                sh.dtype == DType::kFloat16 ? kernels::FloatToHalf(a) : kernels::FloatToBFloat16(a);
            v[i] =
                sh.dtype == DType::kFloat16 ? kernels::FloatToHalf(b) : kernels::FloatToBFloat16(b);
          }
          for (int m = 0; m < nm; ++m) {
            const kc::DecodeSegment& s = item_segs[m][si];
            const size_t per = (SegBytes(s, d) + 15) & ~size_t{15};
            uint8_t* base = host[m].data() + static_cast<size_t>(item) * (set_bytes[m] / sh.batch) +
                            seg_off[m][si] + static_cast<size_t>(head) * 2 * per;
            SectionFormat f;
            f.kind = static_cast<SectionKind>(s.k_kind);
            f.head_dim = d;
            f.tokens = s.tokens;
            f.group = 32;
            f.k = f.kind == SectionKind::kDense ? d : s.k_keep;
            f.dtype = sh.dtype;
            kernels::CompressSection(f, k.data(), nullptr, nullptr, base);
            kernels::CompressSection(f, v.data(), nullptr, nullptr, base + per);
          }
        }
      });
    }
    for (auto& th : pool) th.join();

    for (int m = 0; m < nm; ++m) {
      DeviceSet& ds = result[m][set];
      CUDA_OK(cudaMalloc(&ds.arena, set_bytes[m]));
      CUDA_OK(cudaMemcpy(ds.arena, host[m].data(), set_bytes[m], cudaMemcpyHostToDevice));
      host[m].clear();
      host[m].shrink_to_fit();
      std::vector<kc::DecodeItem> items(sh.batch);
      std::vector<kc::DecodeSegment> segs;
      std::vector<void*> table(static_cast<size_t>(sh.batch) * segs_per_item * kKvHeads * 2);
      const size_t nptr = table.size() / 2;
      for (int i = 0; i < sh.batch; ++i) {
        items[i].q = q + static_cast<size_t>(i) * qh * d;
        items[i].out = out + static_cast<size_t>(i) * qh * d;
        items[i].lse = lse + static_cast<size_t>(i) * qh;
        items[i].scale = 1.0f / std::sqrt(static_cast<float>(d));
        items[i].segment_begin = static_cast<int>(segs.size());
        items[i].num_segments = segs_per_item;
        for (int si = 0; si < segs_per_item; ++si) {
          const kc::DecodeSegment& s = item_segs[m][si];
          const size_t per = (SegBytes(s, d) + 15) & ~size_t{15};
          const int gs = static_cast<int>(segs.size());
          for (int h = 0; h < kKvHeads; ++h) {
            uint8_t* base = ds.arena + static_cast<size_t>(i) * (set_bytes[m] / sh.batch) +
                            seg_off[m][si] + static_cast<size_t>(h) * 2 * per;
            table[static_cast<size_t>(gs) * kKvHeads + h] = base;
            table[nptr + static_cast<size_t>(gs) * kKvHeads + h] = base + per;
          }
          segs.push_back(s);
        }
      }
      const bool dense = modes[m].sparsity == 0.0;
      kc::BatchDecodePlan plan;
      CUDA_OK(kc::PlanBatchDecode(bshape, dense, items.data(), sh.batch, segs.data(),
                                  static_cast<int>(segs.size()), num_sms, &plan));
      ds.bytes = kc::BatchDecodeSectionBytes(bshape, items.data(), sh.batch, segs.data());
      CUDA_OK(cudaMalloc(&ds.table, sizeof(void*) * table.size()));
      CUDA_OK(
          cudaMemcpy(ds.table, table.data(), sizeof(void*) * table.size(), cudaMemcpyHostToDevice));
      CUDA_OK(cudaMalloc(&ds.items, sizeof(kc::DecodeItem) * items.size()));
      CUDA_OK(cudaMemcpy(ds.items, items.data(), sizeof(kc::DecodeItem) * items.size(),
                         cudaMemcpyHostToDevice));
      CUDA_OK(cudaMalloc(&ds.segments, sizeof(kc::DecodeSegment) * segs.size()));
      CUDA_OK(cudaMemcpy(ds.segments, segs.data(), sizeof(kc::DecodeSegment) * segs.size(),
                         cudaMemcpyHostToDevice));
      CUDA_OK(cudaMalloc(&ds.units, sizeof(kc::DecodeWorkUnit) * plan.units.size()));
      CUDA_OK(cudaMemcpy(ds.units, plan.units.data(),
                         sizeof(kc::DecodeWorkUnit) * plan.units.size(), cudaMemcpyHostToDevice));
      CUDA_OK(cudaMalloc(&ds.block_units, sizeof(int32_t) * plan.block_units.size()));
      CUDA_OK(cudaMemcpy(ds.block_units, plan.block_units.data(),
                         sizeof(int32_t) * plan.block_units.size(), cudaMemcpyHostToDevice));
      const size_t pout = plan.partial_out_floats(bshape), plse = plan.partial_lse_floats(bshape);
      CUDA_OK(cudaMalloc(&ds.partial, sizeof(float) * (pout + plse)));
      CUDA_OK(cudaMalloc(&ds.counters, sizeof(int32_t) * sh.batch * kKvHeads));
      CUDA_OK(cudaMemset(ds.counters, 0, sizeof(int32_t) * sh.batch * kKvHeads));
      kc::BatchDecodeParams& p = ds.params;
      p.shape = bshape;
      p.items = ds.items;
      p.segments = ds.segments;
      p.k_sections = ds.table;
      p.v_sections = ds.table + nptr;
      p.units = ds.units;
      p.block_units = ds.block_units;
      p.partial_out = ds.partial;
      p.partial_lse = ds.partial + pout;
      p.counters = ds.counters;
      p.num_items = sh.batch;
      p.num_segments = static_cast<int>(segs.size());
      p.num_units = static_cast<int>(plan.units.size());
      p.num_blocks = plan.num_blocks;
      p.stage_bytes = plan.stage_bytes;
      p.smem_bytes = plan.smem_bytes;
      if (set == 0) {
        std::fprintf(stderr,
                     "  %s: %d blocks (%d per SM), %zu units, stage %d B, smem %d B/block, %.1f MB "
                     "per set\n",
                     modes[m].name, plan.num_blocks, plan.blocks_per_sm, plan.units.size(),
                     plan.stage_bytes, plan.smem_bytes, ds.bytes / 1e6);
      }
    }
  }
  return result;
}

int Main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no usable CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  const int iters = std::atoi(Flag(argc, argv, "iters", "30").c_str());
  const int warmup = std::atoi(Flag(argc, argv, "warmup", "5").c_str());
  const std::string which = Flag(argc, argv, "shapes", "issue");
  const std::string json_path = Flag(argc, argv, "json", "");
  std::vector<Shape> shapes;
  if (which == "smoke") {
    shapes = {{2, 1000, 128, DType::kFloat16}};
  } else {
    shapes = {{1, 32768, 128, DType::kFloat16},   {1, 131072, 128, DType::kFloat16},
              {8, 32768, 128, DType::kFloat16},   {16, 32768, 128, DType::kFloat16},
              {16, 131072, 128, DType::kFloat16}, {64, 16384, 128, DType::kFloat16},
              {16, 32768, 64, DType::kFloat16},   {16, 32768, 128, DType::kBFloat16}};
  }
  // --only BATCHxCONTEXT[xHEAD_DIM[xbf16]] keeps one shape; --modes a,b keeps some modes (the
  // dense one always runs: the others report their ratio to it).
  const std::string only = Flag(argc, argv, "only", "");
  if (!only.empty()) {
    std::vector<Shape> kept;
    for (const Shape& sh : shapes) {
      std::string name = std::to_string(sh.batch) + "x" + std::to_string(sh.context);
      std::string full =
          name + "x" + std::to_string(sh.head_dim) + (sh.dtype == DType::kBFloat16 ? "xbf16" : "");
      if (only == name ? (sh.head_dim == 128 && sh.dtype == DType::kFloat16) : only == full) {
        kept.push_back(sh);
      }
    }
    shapes = kept;
  }
  const std::string mode_list = Flag(argc, argv, "modes", "dense,s0.5,s0.7");
  std::vector<Mode> modes;
  for (const Mode& m : {Mode{"dense", 0.0}, Mode{"s0.5", 0.5}, Mode{"s0.7", 0.7}}) {
    if (m.sparsity == 0.0 ||
        ("," + mode_list + ",").find("," + std::string(m.name) + ",") != std::string::npos) {
      modes.push_back(m);
    }
  }
  FILE* json = json_path.empty() ? nullptr : std::fopen(json_path.c_str(), "w");
  std::printf("device: %s, %d SMs, L2 %.0f MB; GQA %d/%d, chunks of %d, dense window %d\n\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1e6, kKvHeads * kGroup,
              kKvHeads, kChunk, kWindow);
  std::printf(
      "| batch | context | head_dim | dtype | mode | MB read | sets | median ms | TB/s | "
      "vs own dense |\n|---|---|---|---|---|---|---|---|---|---|\n");
  std::fflush(stdout);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cudaEvent_t ev[2];
  CUDA_OK(cudaEventCreate(&ev[0]));
  CUDA_OK(cudaEventCreate(&ev[1]));
  for (const Shape& sh : shapes) {
    // Enough distinct copies that the smallest mode reads >= 4x L2 between reuses.
    const std::vector<kc::DecodeSegment> s07 = ItemSegments(sh.context, 0.7, sh.head_dim);
    double small = 0;
    for (const auto& s : s07) small += 2.0 * kKvHeads * SegBytes(s, sh.head_dim);
    small *= sh.batch;
    const int sets = std::max(1, static_cast<int>(std::ceil(4 * kL2Bytes / small)));
    std::fprintf(stderr, "shape batch %d context %d head_dim %d %s: %d sets\n", sh.batch,
                 sh.context, sh.head_dim, kernels::DTypeName(sh.dtype), sets);
    std::vector<float*> bufs;
    std::vector<std::vector<DeviceSet>> all =
        BuildSets(sh, modes, sets, prop.multiProcessorCount, &bufs);
    double dense_ms = 0;
    for (size_t m = 0; m < modes.size(); ++m) {
      const bool dense = modes[m].sparsity == 0.0;
      auto launch = [&](int i) {
        const kc::BatchDecodeParams& p = all[m][i % sets].params;
        CUDA_OK(dense ? kc::BatchDecodeDense(p, stream) : kc::BatchDecode(p, stream));
      };
      for (int i = 0; i < warmup; ++i) launch(i);
      CUDA_OK(cudaStreamSynchronize(stream));
      std::vector<double> ms;
      for (int i = 0; i < iters; ++i) {
        SpinKernel<<<1, 1, 0, stream>>>(30000);
        CUDA_OK(cudaEventRecord(ev[0], stream));
        launch(i);
        CUDA_OK(cudaEventRecord(ev[1], stream));
        CUDA_OK(cudaEventSynchronize(ev[1]));
        float t = 0;
        CUDA_OK(cudaEventElapsedTime(&t, ev[0], ev[1]));
        ms.push_back(t);
      }
      const double med = Median(ms);
      const std::vector<double> sorted = [&] {
        std::vector<double> s = ms;
        std::sort(s.begin(), s.end());
        return s;
      }();
      if (dense) dense_ms = med;
      const double bytes = static_cast<double>(all[m][0].bytes);
      const double tbps = bytes / (med * 1e-3) / 1e12;
      std::printf("| %d | %d | %d | %s | %s | %.1f | %d | %.4f | %.2f | %s |\n", sh.batch,
                  sh.context, sh.head_dim, kernels::DTypeName(sh.dtype), modes[m].name, bytes / 1e6,
                  sets, med, tbps,
                  dense ? "1.00x" : (std::to_string(dense_ms / med).substr(0, 4) + "x").c_str());
      std::fflush(stdout);
      if (json) {
        std::fprintf(json,
                     "{\"batch\": %d, \"context\": %d, \"head_dim\": %d, \"dtype\": \"%s\", "
                     "\"mode\": \"%s\", \"bytes\": %.0f, \"ms\": %.6f, \"ms_min\": %.6f, "
                     "\"ms_p90\": %.6f, \"tbps\": %.4f, \"sets\": %d}\n",
                     sh.batch, sh.context, sh.head_dim, kernels::DTypeName(sh.dtype), modes[m].name,
                     bytes, med, sorted.front(),
                     sorted[static_cast<size_t>(0.9 * (sorted.size() - 1))], tbps, sets);
        std::fflush(json);
      }
    }
    for (auto& v : all) {
      for (auto& s : v) FreeSet(&s);
    }
    for (float* b : bufs) cudaFree(b);
  }
  if (json) std::fclose(json);
  return 0;
}

}  // namespace
}  // namespace sparsekv::bench

int main(int argc, char** argv) { return sparsekv::bench::Main(argc, argv); }
