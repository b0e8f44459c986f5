// GPU compression benchmark (kernels/cuda/batch_compress.h) on issue #13's target: the K and V
// of a prefill (batch sessions x 8 KV heads x context tokens x head_dim) cut into the server's
// sections (chunks of 256 tokens of one KV head, K or V), all compressed by one BatchCompress
// launch, and decompressed back by one BatchDecompress launch.
//
// Per case it reports the median of --iters launches timed one by one with CUDA events (after
// --warmup launches, each behind a 30 us GPU spin), as GB/s of dense input (compression) or dense
// output (decompression), next to a device-to-device cudaMemcpyAsync of the same dense bytes
// timed the same way in the same run (the copy's GB/s counts each byte once, as ours do, though it
// moves it twice: read + write). "vs copy" is the ratio of the two rates; the issue's target is
// >= 1 TB/s of dense input for the first case (torch.topk on the same rows: 0.047 TB/s).
// Inputs are random (normal-like) values made on the GPU; the first and last sections of every
// case are checked against the CPU compressor (bit-identical bytes) before timing.
//
// Cases (--only NAME keeps one): fp16 head_dim 128 per-token at 0.7 (magnitude) and 0.5; 0.7
// with output-aware K (channel weights); per-channel G = 32 at 0.7 with token weights
// (output-aware); bf16; head_dim 64 and 256.
// Output: a markdown table on stdout and, with --json FILE, one JSON object per case.
// --shapes issue (default) | smoke (tiny, for ctest). Exit 77 without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/compressed_format.h"
#include "kernels/cuda/batch_compress.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/dtype.h"
#include "tests/bench/cuda/bench_util.cuh"

namespace sparsekv::bench {
namespace {

using kernels::DType;
using kernels::SectionFormat;
using kernels::SectionKind;
namespace kc = kernels::cuda;

constexpr int kKvHeads = 8;
constexpr int kChunk = 256;

enum Weights { kNone = 0, kTokenWeights = 1, kChannelWeightsOnK = 2 };

struct Case {
  const char* name;
  int batch;
  int context;
  int head_dim;
  DType dtype;
  SectionKind kind;
  double sparsity;
  int weights;
};

// Normal-like values (sum of four uniforms, scaled to unit variance) from a hash of the index.
__device__ uint32_t Hash(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

__global__ void FillRandom(uint16_t* x, int64_t n, bool bf16, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h1 = Hash(seed + 2 * i), h2 = Hash(seed + 2 * i + 1);
    const float s = (h1 & 0xffff) + (h1 >> 16) + (h2 & 0xffff) + (h2 >> 16);
    const float v = (s / 65536.0f - 2.0f) * 1.732f;
    x[i] =
        bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
  }
}

// Positive weights in (0, 2).
__global__ void FillWeights(float* w, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    w[i] = (Hash(seed + i) >> 8) * (2.0f / 16777216.0f) + 1e-3f;
  }
}

struct DeviceCase {
  uint8_t* dense = nullptr;     // [batch, heads, 2 (K, V), context, head_dim]
  uint8_t* sections = nullptr;  // every section, 16-byte aligned
  uint8_t* dense_out = nullptr;
  float* token_w = nullptr;    // [batch, heads, context]
  float* channel_w = nullptr;  // [batch, heads, head_dim]
  kc::SectionJob* jobs = nullptr;
  kc::SectionJob* djobs = nullptr;  // the same, writing dense_out
  std::vector<kc::SectionJob> host_jobs;
  kc::BatchCompressPlan plan;
  int64_t dense_bytes = 0;
  int64_t section_bytes = 0;  // sum of SectionFormat::bytes(), without alignment padding
};

DeviceCase Build(const Case& c) {
  DeviceCase dc;
  const size_t es = kernels::DTypeSize(c.dtype);
  const int64_t rows_per_tensor = static_cast<int64_t>(c.batch) * kKvHeads * c.context;
  dc.dense_bytes = 2 * rows_per_tensor * c.head_dim * es;
  const SectionFormat f =
      kernels::MakeSectionFormat(c.kind, c.sparsity, c.head_dim, kChunk, 32, c.dtype);
  const size_t stride = (f.bytes() + 15) & ~size_t{15};
  const int64_t sections = 2 * rows_per_tensor / kChunk;
  CUDA_OK(cudaMalloc(&dc.dense, dc.dense_bytes));
  CUDA_OK(cudaMalloc(&dc.dense_out, dc.dense_bytes));
  CUDA_OK(cudaMalloc(&dc.sections, sections * stride));
  CUDA_OK(cudaMalloc(&dc.token_w, rows_per_tensor * sizeof(float)));
  CUDA_OK(cudaMalloc(&dc.channel_w,
                     static_cast<size_t>(c.batch) * kKvHeads * c.head_dim * sizeof(float)));
  FillRandom<<<1024, 256>>>(reinterpret_cast<uint16_t*>(dc.dense), dc.dense_bytes / 2,
                            c.dtype == DType::kBFloat16, 12345);
  FillWeights<<<256, 256>>>(dc.token_w, rows_per_tensor, 777);
  FillWeights<<<64, 256>>>(dc.channel_w, static_cast<int64_t>(c.batch) * kKvHeads * c.head_dim,
                           999);
  CUDA_OK(cudaGetLastError());
  const int64_t chunks = c.context / kChunk;
  for (int b = 0; b < c.batch; ++b) {
    for (int h = 0; h < kKvHeads; ++h) {
      const int64_t bh = static_cast<int64_t>(b) * kKvHeads + h;
      for (int kv = 0; kv < 2; ++kv) {
        for (int64_t ch = 0; ch < chunks; ++ch) {
          kc::SectionJob j;
          j.format = f;
          const int64_t row0 = (bh * 2 + kv) * c.context + ch * kChunk;
          j.dense = dc.dense + row0 * c.head_dim * es;
          j.section = dc.sections + static_cast<int64_t>(dc.host_jobs.size()) * stride;
          if (c.weights & kTokenWeights) j.token_weight = dc.token_w + bh * c.context + ch * kChunk;
          if ((c.weights & kChannelWeightsOnK) && kv == 0) {
            j.channel_weight = dc.channel_w + bh * c.head_dim;
          }
          dc.host_jobs.push_back(j);
          dc.section_bytes += f.bytes();
        }
      }
    }
  }
  CUDA_OK(kc::PlanBatchCompress(dc.host_jobs.data(), static_cast<int>(dc.host_jobs.size()), 0,
                                &dc.plan));
  const size_t jobs_bytes = sizeof(kc::SectionJob) * dc.host_jobs.size();
  CUDA_OK(cudaMalloc(&dc.jobs, jobs_bytes));
  CUDA_OK(cudaMemcpy(dc.jobs, dc.host_jobs.data(), jobs_bytes, cudaMemcpyHostToDevice));
  std::vector<kc::SectionJob> out = dc.host_jobs;
  for (kc::SectionJob& j : out) {
    j.dense = dc.dense_out + (static_cast<uint8_t*>(j.dense) - dc.dense);
  }
  CUDA_OK(cudaMalloc(&dc.djobs, jobs_bytes));
  CUDA_OK(cudaMemcpy(dc.djobs, out.data(), jobs_bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaDeviceSynchronize());
  return dc;
}

void Free(DeviceCase* dc) {
  for (void* p : {static_cast<void*>(dc->dense), static_cast<void*>(dc->sections),
                  static_cast<void*>(dc->dense_out), static_cast<void*>(dc->token_w),
                  static_cast<void*>(dc->channel_w), static_cast<void*>(dc->jobs),
                  static_cast<void*>(dc->djobs)}) {
    CUDA_OK(cudaFree(p));
  }
}

// Compresses job i on the CPU from the device's inputs and compares with the device's bytes,
// then the device's decompression (in dense_out) with the CPU's.
bool CheckJob(const DeviceCase& dc, size_t i) {
  const kc::SectionJob& j = dc.host_jobs[i];
  const SectionFormat& f = j.format;
  std::vector<uint8_t> x(static_cast<size_t>(f.tokens) * f.head_dim * kernels::DTypeSize(f.dtype));
  std::vector<uint8_t> got(f.bytes()), want(f.bytes());
  std::vector<float> tw(f.tokens), cw(f.head_dim);
  CUDA_OK(cudaMemcpy(x.data(), j.dense, x.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(got.data(), j.section, got.size(), cudaMemcpyDeviceToHost));
  if (j.token_weight) {
    CUDA_OK(cudaMemcpy(tw.data(), j.token_weight, tw.size() * 4, cudaMemcpyDeviceToHost));
  }
  if (j.channel_weight) {
    CUDA_OK(cudaMemcpy(cw.data(), j.channel_weight, cw.size() * 4, cudaMemcpyDeviceToHost));
  }
  kernels::CompressSection(f, x.data(), j.token_weight ? tw.data() : nullptr,
                           j.channel_weight ? cw.data() : nullptr, want.data());
  if (got != want) return false;
  std::vector<uint8_t> dense(x.size()), want_dense(x.size());
  const uint8_t* out = dc.dense_out + (static_cast<const uint8_t*>(j.dense) - dc.dense);
  CUDA_OK(cudaMemcpy(dense.data(), out, dense.size(), cudaMemcpyDeviceToHost));
  kernels::DecompressSection(f, want.data(), want_dense.data());
  return dense == want_dense;
}

int Main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no usable CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  if (prop.major < 9) {
    std::printf("SKIP: needs compute capability 9.0 (sm_90 build)\n");
    return 77;
  }
  const int iters = std::atoi(Flag(argc, argv, "iters", "20").c_str());
  const int warmup = std::atoi(Flag(argc, argv, "warmup", "3").c_str());
  const std::string json_path = Flag(argc, argv, "json", "");
  const std::string only = Flag(argc, argv, "only", "");
  const DType f16 = DType::kFloat16, bf16 = DType::kBFloat16;
  const SectionKind tok = SectionKind::kPerToken, chan = SectionKind::kPerChannel;
  std::vector<Case> cases;
  if (Flag(argc, argv, "shapes", "issue") == "smoke") {
    cases = {{"smoke", 2, 1024, 128, f16, tok, 0.7, kNone},
             {"smoke_channel", 2, 1024, 128, f16, chan, 0.7, kTokenWeights}};
  } else {
    cases = {{"prefill_t0.7", 16, 32768, 128, f16, tok, 0.7, kNone},
             {"prefill_t0.5", 16, 32768, 128, f16, tok, 0.5, kNone},
             {"prefill_t0.7_oaK", 16, 32768, 128, f16, tok, 0.7, kChannelWeightsOnK},
             {"prefill_c0.7_oa", 16, 32768, 128, f16, chan, 0.7, kTokenWeights},
             {"prefill_t0.7_bf16", 16, 32768, 128, bf16, tok, 0.7, kNone},
             {"prefill_t0.7_d64", 16, 32768, 64, f16, tok, 0.7, kNone},
             {"prefill_t0.7_d256", 8, 32768, 256, f16, tok, 0.7, kNone}};
  }
  FILE* json = json_path.empty() ? nullptr : std::fopen(json_path.c_str(), "w");
  std::printf("device: %s, %d SMs, L2 %.0f MB; %d KV heads, sections of %d tokens (K and V)\n\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1e6, kKvHeads, kChunk);
  std::printf(
      "| case | batch x context | head_dim | dtype | sections | dense MB | compressed MB | "
      "copy GB/s | compress ms | compress GB/s | vs copy | decompress ms | decompress GB/s | "
      "vs copy | check |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  std::fflush(stdout);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cudaEvent_t ev[2];
  CUDA_OK(cudaEventCreate(&ev[0]));
  CUDA_OK(cudaEventCreate(&ev[1]));
  // Median ms of `iters` timed runs of `launch` after `warmup` untimed ones.
  auto median_ms = [&](auto launch) {
    for (int i = 0; i < warmup; ++i) launch();
    CUDA_OK(cudaStreamSynchronize(stream));
    std::vector<double> ms;
    for (int i = 0; i < iters; ++i) {
      SpinKernel<<<1, 1, 0, stream>>>(30000);
      CUDA_OK(cudaEventRecord(ev[0], stream));
      launch();
      CUDA_OK(cudaEventRecord(ev[1], stream));
      CUDA_OK(cudaEventSynchronize(ev[1]));
      float t = 0;
      CUDA_OK(cudaEventElapsedTime(&t, ev[0], ev[1]));
      ms.push_back(t);
    }
    return Median(ms);
  };
  int status = 0;
  for (const Case& c : cases) {
    if (!only.empty() && only != c.name) continue;
    DeviceCase dc = Build(c);
    kc::BatchCompressParams p;
    p.jobs = dc.jobs;
    p.num_jobs = static_cast<int>(dc.host_jobs.size());
    p.plan = dc.plan;
    kc::BatchCompressParams dp = p;
    dp.jobs = dc.djobs;
    const double copy_ms = median_ms([&] {
      CUDA_OK(cudaMemcpyAsync(dc.dense_out, dc.dense, dc.dense_bytes, cudaMemcpyDeviceToDevice,
                              stream));
    });
    const double comp_ms = median_ms([&] { CUDA_OK(kc::BatchCompress(p, stream)); });
    const double dec_ms = median_ms([&] { CUDA_OK(kc::BatchDecompress(dp, stream)); });
    CUDA_OK(cudaStreamSynchronize(stream));
    const bool ok = CheckJob(dc, 0) && CheckJob(dc, dc.host_jobs.size() - 1);
    if (!ok) status = 1;
    const double gb = dc.dense_bytes / 1e9;
    const double copy_gbps = gb / (copy_ms * 1e-3), comp_gbps = gb / (comp_ms * 1e-3),
                 dec_gbps = gb / (dec_ms * 1e-3);
    std::printf(
        "| %s | %dx%d | %d | %s | %zu | %.0f | %.0f | %.0f | %.3f | %.0f | %.2fx | %.3f | %.0f | "
        "%.2fx | %s |\n",
        c.name, c.batch, c.context, c.head_dim, kernels::DTypeName(c.dtype), dc.host_jobs.size(),
        dc.dense_bytes / 1e6, dc.section_bytes / 1e6, copy_gbps, comp_ms, comp_gbps,
        comp_gbps / copy_gbps, dec_ms, dec_gbps, dec_gbps / copy_gbps, ok ? "ok" : "MISMATCH");
    std::fflush(stdout);
    if (json) {
      std::fprintf(json,
                   "{\"case\": \"%s\", \"batch\": %d, \"context\": %d, \"head_dim\": %d, "
                   "\"dtype\": \"%s\", \"kind\": \"%s\", \"sparsity\": %.2f, \"weights\": %d, "
                   "\"sections\": %zu, \"dense_bytes\": %lld, \"compressed_bytes\": %lld, "
                   "\"copy_ms\": %.6f, \"copy_gbps\": %.2f, \"compress_ms\": %.6f, "
                   "\"compress_gbps\": %.2f, \"compress_vs_copy\": %.4f, \"decompress_ms\": %.6f, "
                   "\"decompress_gbps\": %.2f, \"decompress_vs_copy\": %.4f, \"check\": %s}\n",
                   c.name, c.batch, c.context, c.head_dim, kernels::DTypeName(c.dtype),
                   c.kind == SectionKind::kPerToken ? "per-token" : "per-channel", c.sparsity,
                   c.weights, dc.host_jobs.size(), static_cast<long long>(dc.dense_bytes),
                   static_cast<long long>(dc.section_bytes), copy_ms, copy_gbps, comp_ms, comp_gbps,
                   comp_gbps / copy_gbps, dec_ms, dec_gbps, dec_gbps / copy_gbps,
                   ok ? "true" : "false");
      std::fflush(json);
    }
    Free(&dc);
  }
  if (json) std::fclose(json);
  CUDA_OK(cudaStreamDestroy(stream));
  return status;
}

}  // namespace
}  // namespace sparsekv::bench

int main(int argc, char** argv) { return sparsekv::bench::Main(argc, argv); }
