// GPU test of kernels/cuda/batch_compress.h against the CPU compressor (kernels::CompressSection
// and DecompressSection, the oracle), on fresh random inputs:
//   dtype fp16/bf16 x head_dim 64/128/256 x {per-token, per-channel G = 32, per-channel G = 64,
//   dense} x keep counts {1, 2, sparsity 0.7, sparsity 0.5, n - 1, n, one random} x weights
//   {none, token, channel, both}, each section of a random ragged length (per-channel: a random
//   number of groups), with data of four kinds in turn: normal values; heavy ties (a few repeated
//   magnitudes of both signs, so many elements share a score); extremes (max finite, +-inf,
//   subnormals, +-0, quiet NaNs with payloads, next to ordinary values); and magnitudes spread
//   over the whole exponent range. Weights include zeros (so inf * 0 happens) and huge values (so
//   products overflow to inf), and repeat, so weighted scores tie too.
// All sections of one dtype go through one BatchCompress launch, twice: planned for the whole
// device, and for one SM (so that each block runs many tiles across section boundaries), into
// outputs poisoned with two different bytes. The section bytes must equal the CPU's exactly both
// times (an unwritten byte cannot match both poisons) and the 16 guard bytes after every section
// must be untouched. BatchDecompress of the GPU sections must equal DecompressSection of the CPU
// sections, bit for bit, with guards. The first mismatch is printed with its section (format,
// weights, data kind), vector and element, and the vector's inputs and score keys.
// Also checks that PlanBatchCompress rejects unsupported jobs and that an empty batch launches
// nothing.
//
// Exit codes: 0 all passed, 1 a failure, 77 no usable CUDA device (ctest SKIP_RETURN_CODE).
// --quick: a small batch per dtype (for compute-sanitizer).
#include "kernels/cuda/batch_compress.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/compressed_format.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/dtype.h"

namespace sparsekv::kernels::cuda {
namespace {

constexpr int kSkip = 77;
constexpr size_t kGuard = 16;  // bytes after every output region, checked untouched
constexpr uint8_t kGuardByte = 0xC3;

enum class Data { kNormal, kTies, kExtreme, kWideRange };
constexpr const char* kDataNames[] = {"normal", "ties", "extreme", "wide-range"};
constexpr const char* kWeightNames[] = {"none", "token", "channel", "token+channel"};

// One section of the batch, with its host inputs and the CPU's outputs.
struct Section {
  SectionFormat f;
  Data data;
  int weights;                   // bit 0: token weights, bit 1: channel weights
  std::vector<uint16_t> x;       // [tokens, head_dim] storage bits
  std::vector<float> token_w;    // [tokens] or empty
  std::vector<float> channel_w;  // [head_dim] or empty
  std::vector<uint8_t> cpu;      // CompressSection's bytes
  std::vector<uint16_t> cpu_x;   // DecompressSection of cpu
  // Offsets into the batch's arenas.
  size_t x_off = 0, sec_off = 0, tw_off = 0, cw_off = 0;
};

size_t Align16(size_t n) { return (n + 15) & ~size_t{15}; }

std::string Describe(const Section& s) {
  const SectionFormat& f = s.f;
  std::string kind = f.kind == SectionKind::kDense ? "dense"
                     : f.kind == SectionKind::kPerToken
                         ? "per-token"
                         : "per-channel G=" + std::to_string(f.group);
  return kind + ", " + DTypeName(f.dtype) + ", head_dim " + std::to_string(f.head_dim) +
         ", tokens " + std::to_string(f.tokens) + ", k " + std::to_string(f.k) + ", weights " +
         kWeightNames[s.weights] + ", data " + kDataNames[static_cast<int>(s.data)];
}

// ---------------------------------------------------------------------------------------------
// Inputs.

uint16_t Bits(DType dt, float v) {
  return dt == DType::kFloat16 ? FloatToHalf(v) : FloatToBFloat16(v);
}

// Special values of the dtype: max finite, +-inf, smallest and largest subnormal, +-0, quiet
// NaNs with and without payload and of both signs.
std::vector<uint16_t> Extremes(DType dt) {
  if (dt == DType::kFloat16) {
    return {0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x0001, 0x8001, 0x03ff,
            0x0000, 0x8000, 0x7e00, 0x7e01, 0xfe00, 0x7fff, 0x0400};
  }
  return {0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x0001, 0x8001, 0x007f,
          0x0000, 0x8000, 0x7fc0, 0x7fc1, 0xffc0, 0x7fff, 0x0080};
}

uint16_t RandomElement(DType dt, Data data, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  switch (data) {
    case Data::kNormal:
      return Bits(dt, normal(rng));
    case Data::kTies: {
      static constexpr float kValues[] = {0.5f, 1.0f, 1.5f, 2.0f, 0.0f};
      const float v = kValues[pick(rng) % 5];
      return Bits(dt, pick(rng) % 2 ? v : -v);
    }
    case Data::kExtreme: {
      if (pick(rng) % 3 != 0) return Bits(dt, normal(rng));
      const std::vector<uint16_t> e = Extremes(dt);
      return e[pick(rng) % e.size()];
    }
    case Data::kWideRange: {
      // Exponents over the dtype's whole normal and subnormal range, random mantissa and sign.
      const int lo = dt == DType::kFloat16 ? -24 : -133, hi = dt == DType::kFloat16 ? 15 : 127;
      const int exp = lo + pick(rng) % (hi - lo + 1);
      const float v = std::ldexp(1.0f + (pick(rng) % 1024) / 1024.0f, exp);
      return Bits(dt, pick(rng) % 2 ? v : -v);
    }
  }
  return 0;
}

// Weights >= 0 and finite: mostly in [0, 2), with exact zeros, repeats and huge values.
std::vector<float> RandomWeights(int n, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> pick(0, 99);
  std::uniform_real_distribution<float> u(0.0f, 2.0f);
  std::vector<float> w(n);
  for (float& v : w) {
    const int p = pick(rng);
    v = p < 10 ? 0.0f : p < 20 ? 0.75f : p < 23 ? 1e30f : u(rng);
  }
  return w;
}

// Keep counts tried for vectors of n elements.
std::vector<int> KeepCounts(int n, bool quick, std::mt19937_64& rng) {
  std::vector<int> ks = {KeepCount(0.7, n), KeepCount(0.5, n), 1, n};
  if (!quick) {
    ks.push_back(2);
    ks.push_back(n - 1);
    ks.push_back(1 + static_cast<int>(rng() % n));
  }
  std::sort(ks.begin(), ks.end());
  ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
  return ks;
}

Section MakeSection(SectionFormat f, Data data, int weights, std::mt19937_64& rng) {
  Section s;
  s.f = f;
  s.data = data;
  s.weights = weights;
  s.x.resize(static_cast<size_t>(f.tokens) * f.head_dim);
  for (uint16_t& v : s.x) v = RandomElement(f.dtype, data, rng);
  if (weights & 1) s.token_w = RandomWeights(f.tokens, rng);
  if (weights & 2) s.channel_w = RandomWeights(f.head_dim, rng);
  s.cpu.resize(f.bytes());
  CompressSection(f, s.x.data(), s.token_w.empty() ? nullptr : s.token_w.data(),
                  s.channel_w.empty() ? nullptr : s.channel_w.data(), s.cpu.data());
  s.cpu_x.resize(s.x.size());
  DecompressSection(f, s.cpu.data(), s.cpu_x.data());
  return s;
}

std::vector<Section> MakeBatch(DType dt, bool quick, std::mt19937_64& rng) {
  std::vector<Section> out;
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  const std::vector<int> dims =
      quick ? std::vector<int>{dt == DType::kFloat16 ? 128 : 64} : std::vector<int>{64, 128, 256};
  int data = 0;
  for (int d : dims) {
    for (int kind = 0; kind < 4; ++kind) {  // per-token, per-channel 32, per-channel 64, dense
      const SectionKind sk = kind == 0   ? SectionKind::kPerToken
                             : kind == 3 ? SectionKind::kDense
                                         : SectionKind::kPerChannel;
      const int group = kind == 2 ? 64 : 32;
      const int n = sk == SectionKind::kPerChannel ? group : d;
      const std::vector<int> ks =
          sk == SectionKind::kDense ? std::vector<int>{d} : KeepCounts(n, quick, rng);
      for (int k : ks) {
        for (int weights = 0; weights < 4; ++weights) {
          if (quick && weights != 0 && weights != 3) continue;
          SectionFormat f;
          f.kind = sk;
          f.head_dim = d;
          f.group = group;
          f.k = k;
          f.dtype = dt;
          // Ragged lengths: tiles partly filled, one row, several tiles.
          const int max_units = quick ? 3 : 9;
          f.tokens = sk == SectionKind::kPerChannel ? group * (1 + pick(rng) % max_units)
                                                    : 1 + pick(rng) % (quick ? 70 : 300);
          out.push_back(MakeSection(f, static_cast<Data>(data++ % 4), weights, rng));
        }
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Device side.

struct DeviceBatch {
  uint8_t* x = nullptr;  // dense inputs
  uint8_t* sections = nullptr;
  uint8_t* weights = nullptr;  // floats
  uint8_t* x_out = nullptr;    // decompressed rows
  SectionJob* jobs = nullptr;
  size_t x_bytes = 0, sec_bytes = 0, w_bytes = 0;
  std::vector<SectionJob> host_jobs;
  BatchCompressPlan plan;         // the device's SMs
  BatchCompressPlan plan_one_sm;  // one SM
};

void Upload(std::vector<Section>* batch, DeviceBatch* db) {
  for (Section& s : *batch) {
    s.x_off = db->x_bytes;
    db->x_bytes += Align16(s.x.size() * 2 + kGuard);
    s.sec_off = db->sec_bytes;
    db->sec_bytes += Align16(s.cpu.size() + kGuard);
    s.tw_off = db->w_bytes;
    db->w_bytes += Align16(s.token_w.size() * 4);
    s.cw_off = db->w_bytes;
    db->w_bytes += Align16(s.channel_w.size() * 4);
  }
  db->w_bytes = std::max<size_t>(db->w_bytes, 16);
  CUDA_OK(cudaMalloc(&db->x, db->x_bytes));
  CUDA_OK(cudaMalloc(&db->x_out, db->x_bytes));
  CUDA_OK(cudaMalloc(&db->sections, db->sec_bytes));
  CUDA_OK(cudaMalloc(&db->weights, db->w_bytes));
  std::vector<uint8_t> hx(db->x_bytes, kGuardByte), hw(db->w_bytes, 0);
  for (const Section& s : *batch) {
    std::memcpy(hx.data() + s.x_off, s.x.data(), s.x.size() * 2);
    if (!s.token_w.empty())
      std::memcpy(hw.data() + s.tw_off, s.token_w.data(), s.token_w.size() * 4);
    if (!s.channel_w.empty()) {
      std::memcpy(hw.data() + s.cw_off, s.channel_w.data(), s.channel_w.size() * 4);
    }
  }
  CUDA_OK(cudaMemcpy(db->x, hx.data(), hx.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db->weights, hw.data(), hw.size(), cudaMemcpyHostToDevice));
  for (const Section& s : *batch) {
    SectionJob j;
    j.format = s.f;
    j.dense = db->x + s.x_off;
    j.section = db->sections + s.sec_off;
    j.token_weight =
        s.token_w.empty() ? nullptr : reinterpret_cast<const float*>(db->weights + s.tw_off);
    j.channel_weight =
        s.channel_w.empty() ? nullptr : reinterpret_cast<const float*>(db->weights + s.cw_off);
    db->host_jobs.push_back(j);
  }
  // Two plans over the same jobs: the whole device, and one SM's worth of blocks (every block
  // then runs many tiles across job boundaries).
  const int n = static_cast<int>(db->host_jobs.size());
  CUDA_OK(PlanBatchCompress(db->host_jobs.data(), n, 0, &db->plan));
  CUDA_OK(PlanBatchCompress(db->host_jobs.data(), n, 1, &db->plan_one_sm));
  CUDA_OK(cudaMalloc(&db->jobs, sizeof(SectionJob) * db->host_jobs.size()));
  CUDA_OK(cudaMemcpy(db->jobs, db->host_jobs.data(), sizeof(SectionJob) * db->host_jobs.size(),
                     cudaMemcpyHostToDevice));
}

void Free(DeviceBatch* db) {
  CUDA_OK(cudaFree(db->x));
  CUDA_OK(cudaFree(db->x_out));
  CUDA_OK(cudaFree(db->sections));
  CUDA_OK(cudaFree(db->weights));
  CUDA_OK(cudaFree(db->jobs));
}

// ---------------------------------------------------------------------------------------------
// Checks.

// The CPU's ranking key (compress.cc), for failure reports.
uint32_t HostKey(const Section& s, int t, int j) {
  const float v = LoadAsFloat(s.f.dtype, s.x.data(), static_cast<size_t>(t) * s.f.head_dim + j);
  const float tw = s.token_w.empty() ? 1.0f : s.token_w[t];
  const float cw = s.channel_w.empty() ? 1.0f : s.channel_w[j];
  return FloatBits(std::fabs(v) * tw * cw) & 0x7fffffffu;
}

// Prints vector v's elements (storage bits and score key) and both bitmaps.
void PrintVector(const Section& s, int v, const uint8_t* gpu) {
  const SectionFormat& f = s.f;
  const bool per_token = f.kind == SectionKind::kPerToken;
  const int n = f.n();
  const int t0 = per_token ? v : (v / f.head_dim) * f.group;
  const int j0 = per_token ? 0 : v % f.head_dim;
  std::fprintf(
      stderr, "  vector %d = %s %d%s, n %d, k %d; element: bits/key [cpu kept, gpu kept]\n", v,
      per_token ? "token" : "channel", per_token ? t0 : j0,
      per_token ? ""
                : (" of tokens [" + std::to_string(t0) + ", " + std::to_string(t0 + f.group) + ")")
                      .c_str(),
      n, f.k);
  for (int i = 0; i < n; ++i) {
    const int t = per_token ? t0 : t0 + i;
    const int j = per_token ? i : j0;
    std::fprintf(stderr, "    %3d: %04x/%08x [%d %d]\n", i,
                 s.x[static_cast<size_t>(t) * f.head_dim + j], HostKey(s, t, j),
                 BitmapTest(s.cpu.data(), n, v, i), BitmapTest(gpu, n, v, i));
  }
}

// Compares one section's GPU bytes with the CPU's; reports the first difference.
bool CheckSection(const Section& s, size_t index, const uint8_t* gpu, const char* what) {
  const SectionFormat& f = s.f;
  for (size_t g = 0; g < kGuard; ++g) {
    if (gpu[s.cpu.size() + g] != kGuardByte) {
      std::fprintf(stderr, "FAIL %s: section %zu (%s): wrote past its end (guard byte %zu)\n", what,
                   index, Describe(s).c_str(), g);
      return false;
    }
  }
  const auto diff = std::mismatch(s.cpu.begin(), s.cpu.end(), gpu);
  if (diff.first == s.cpu.end()) return true;
  const size_t off = diff.first - s.cpu.begin();
  std::fprintf(stderr, "FAIL %s: section %zu (%s): first differing byte %zu of %zu: ", what, index,
               Describe(s).c_str(), off, s.cpu.size());
  if (f.kind == SectionKind::kDense) {
    const size_t e = off / 2;
    std::fprintf(stderr, "dense token %zu channel %zu: gpu byte %02x, cpu %02x\n", e / f.head_dim,
                 e % f.head_dim, gpu[off], s.cpu[off]);
    return false;
  }
  const size_t bm = BitmapBytes(f.n());
  int v;
  if (off < f.bitmap_bytes()) {
    v = static_cast<int>(off / bm);
    std::fprintf(stderr, "bitmap of vector %d, byte %zu: gpu %02x, cpu %02x\n", v, off % bm,
                 gpu[off], s.cpu[off]);
  } else {
    const size_t vo = off - f.bitmap_bytes();
    v = static_cast<int>(vo / (f.k * 2));
    std::fprintf(stderr, "packed value %zu of vector %d: gpu byte %02x, cpu %02x\n",
                 vo % (f.k * 2) / 2, v, gpu[off], s.cpu[off]);
  }
  static bool printed = false;  // the first failing vector only: it can be 256 lines
  if (!printed) PrintVector(s, v, gpu);
  printed = true;
  return false;
}

// Compares decompressed rows with the CPU's decompression.
bool CheckDense(const Section& s, size_t index, const uint8_t* gpu) {
  const size_t bytes = s.cpu_x.size() * 2;
  for (size_t g = 0; g < kGuard; ++g) {
    if (gpu[bytes + g] != kGuardByte) {
      std::fprintf(stderr,
                   "FAIL decompress: section %zu (%s): wrote past its end (guard byte %zu)\n",
                   index, Describe(s).c_str(), g);
      return false;
    }
  }
  for (size_t e = 0; e < s.cpu_x.size(); ++e) {
    uint16_t got;
    std::memcpy(&got, gpu + 2 * e, 2);
    if (got != s.cpu_x[e]) {
      std::fprintf(stderr,
                   "FAIL decompress: section %zu (%s): first mismatch at token %zu channel %zu: "
                   "gpu %04x, cpu %04x (input %04x)\n",
                   index, Describe(s).c_str(), e / s.f.head_dim, e % s.f.head_dim, got, s.cpu_x[e],
                   s.x[e]);
      return false;
    }
  }
  return true;
}

// Poisons the outputs, runs one compression launch and one decompression launch, checks both.
// Returns the number of failing sections.
int RunAndCheck(const std::vector<Section>& batch, DeviceBatch* db, const BatchCompressPlan& plan,
                uint8_t poison, cudaStream_t stream) {
  // Poison everything, then restore the guards' pattern right after each region.
  std::vector<uint8_t> hs(db->sec_bytes, poison), hx(db->x_bytes, poison);
  for (const Section& s : batch) {
    std::memset(hs.data() + s.sec_off + s.cpu.size(), kGuardByte, kGuard);
    std::memset(hx.data() + s.x_off + s.cpu_x.size() * 2, kGuardByte, kGuard);
  }
  CUDA_OK(cudaMemcpy(db->sections, hs.data(), hs.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db->x_out, hx.data(), hx.size(), cudaMemcpyHostToDevice));
  BatchCompressParams p;
  p.jobs = db->jobs;
  p.num_jobs = static_cast<int>(db->host_jobs.size());
  p.plan = plan;
  CUDA_OK(BatchCompress(p, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaMemcpy(hs.data(), db->sections, hs.size(), cudaMemcpyDeviceToHost));
  int failures = 0;
  char what[64];
  std::snprintf(what, sizeof(what), "compress (%d blocks, poison %02x)", plan.num_blocks, poison);
  for (size_t i = 0; i < batch.size(); ++i) {
    if (!CheckSection(batch[i], i, hs.data() + batch[i].sec_off, what) && ++failures >= 5) {
      std::fprintf(stderr, "(more failures not shown)\n");
      return failures;
    }
  }
  if (failures) return failures;  // decompression needs the CPU's bytes in the sections

  // Decompress into x_out: the same jobs with dense pointing there.
  std::vector<SectionJob> jobs = db->host_jobs;
  for (size_t i = 0; i < jobs.size(); ++i) jobs[i].dense = db->x_out + batch[i].x_off;
  SectionJob* djobs = nullptr;
  CUDA_OK(cudaMalloc(&djobs, sizeof(SectionJob) * jobs.size()));
  CUDA_OK(cudaMemcpy(djobs, jobs.data(), sizeof(SectionJob) * jobs.size(), cudaMemcpyHostToDevice));
  p.jobs = djobs;
  CUDA_OK(BatchDecompress(p, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaFree(djobs));
  CUDA_OK(cudaMemcpy(hx.data(), db->x_out, hx.size(), cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < batch.size(); ++i) {
    if (!CheckDense(batch[i], i, hx.data() + batch[i].x_off) && ++failures >= 5) break;
  }
  return failures;
}

// PlanBatchCompress's validation and the empty batch.
int CheckPlanErrors(cudaStream_t stream) {
  int failures = 0;
  auto expect = [&](const char* what, cudaError_t got, cudaError_t want) {
    if (got != want) {
      std::fprintf(stderr, "FAIL plan: %s: got %s, want %s\n", what, cudaGetErrorName(got),
                   cudaGetErrorName(want));
      ++failures;
    }
  };
  alignas(16) static uint8_t dummy[64];
  SectionJob good;
  good.format = MakeSectionFormat(SectionKind::kPerToken, 0.7, 128, 32, 32, DType::kFloat16);
  good.dense = dummy;
  good.section = dummy;
  BatchCompressPlan plan;
  {
    SectionJob j = good;
    expect("valid job", PlanBatchCompress(&j, 1, 0, &plan), cudaSuccess);
  }
  auto bad = [&](const char* what, auto mutate) {
    SectionJob jobs[2] = {good, good};
    mutate(jobs[1]);
    expect(what, PlanBatchCompress(jobs, 2, 0, &plan), cudaErrorInvalidValue);
  };
  bad("head_dim 96", [](SectionJob& j) { j.format.head_dim = 96; });
  bad("k 0", [](SectionJob& j) { j.format.k = 0; });
  bad("k > n", [](SectionJob& j) { j.format.k = 129; });
  bad("mixed dtypes", [](SectionJob& j) { j.format.dtype = DType::kBFloat16; });
  bad("tokens 0", [](SectionJob& j) { j.format.tokens = 0; });
  bad("group 128", [](SectionJob& j) {
    j.format.kind = SectionKind::kPerChannel;
    j.format.group = 128;
    j.format.tokens = 128;
    j.format.k = 10;
  });
  bad("tokens not a multiple of group", [](SectionJob& j) {
    j.format.kind = SectionKind::kPerChannel;
    j.format.tokens = 48;
    j.format.k = 10;
  });
  bad("null section", [](SectionJob& j) { j.section = nullptr; });
  bad("misaligned dense", [](SectionJob& j) { j.dense = dummy + 2; });
  {
    SectionJob j = good;
    j.format.dtype = DType::kFloat32;
    expect("fp32", PlanBatchCompress(&j, 1, 0, &plan), cudaErrorInvalidValue);
  }
  expect("empty plan", PlanBatchCompress(nullptr, 0, 0, &plan), cudaSuccess);
  BatchCompressParams p;
  p.plan = plan;
  expect("empty compress", BatchCompress(p, stream), cudaSuccess);
  expect("empty decompress", BatchDecompress(p, stream), cudaSuccess);
  return failures;
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
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  int failures = CheckPlanErrors(stream);
  std::mt19937_64 rng(20260513);
  size_t sections = 0, vectors = 0, bytes = 0;
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<Section> batch = MakeBatch(dt, quick, rng);
    DeviceBatch db;
    Upload(&batch, &db);
    failures += RunAndCheck(batch, &db, db.plan, 0xA5, stream);
    failures += RunAndCheck(batch, &db, db.plan_one_sm, 0x5A, stream);
    Free(&db);
    sections += batch.size();
    for (const Section& s : batch) {
      vectors += s.f.kind == SectionKind::kDense ? 0 : s.f.vectors();
      bytes += s.cpu.size();
    }
    std::printf("%s: %zu sections in one launch, %lld tiles, %d and %d blocks\n", DTypeName(dt),
                batch.size(), static_cast<long long>(db.plan.num_tiles), db.plan.num_blocks,
                db.plan_one_sm.num_blocks);
  }
  CUDA_OK(cudaStreamDestroy(stream));
  std::printf(
      "compress_test: %zu sections, %zu compressed vectors, %zu section bytes, each "
      "compressed twice and decompressed twice; %d failures\n",
      sections, vectors, bytes, failures);
  if (failures) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("PASSED\n");
  return 0;
}

}  // namespace
}  // namespace sparsekv::kernels::cuda

int main(int argc, char** argv) { return sparsekv::kernels::cuda::Main(argc, argv); }
