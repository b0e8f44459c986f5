// CompressSection throughput (vectors ranked and packed per second, one core) for per-token
// and per-channel sections, magnitude and output-aware (weighted) scoring, with the bytes
// read and written per second. Prints a markdown table.
//
// Flags: --rows (tokens per measured batch, default 65536) --head_dim --chunk --group
//        --sparsity --iters
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/compressed_format.h"
#include "tests/bench/bench_util.h"

namespace sparsekv::bench {
namespace {

using kernels::DType;
using kernels::SectionFormat;
using kernels::SectionKind;

int Main(int argc, char** argv) {
  const int64_t rows = IntFlag(argc, argv, "rows", 65536);
  const int head_dim = static_cast<int>(IntFlag(argc, argv, "head_dim", 128));
  const int chunk = static_cast<int>(IntFlag(argc, argv, "chunk", 256));
  const int group = static_cast<int>(IntFlag(argc, argv, "group", 32));
  const double sparsity = std::stod(Flag(argc, argv, "sparsity", "0.7"));
  const int iters = static_cast<int>(IntFlag(argc, argv, "iters", 5));
  const int64_t chunks = std::max<int64_t>(1, rows / chunk);
  const DType dt = DType::kFloat16;

  std::vector<uint8_t> x(static_cast<size_t>(chunks) * chunk * head_dim * 2);
  Rng rng(7);
  for (size_t i = 0; i < x.size() / 2; ++i) kernels::StoreFromFloat(dt, x.data(), i, rng.Normal());
  std::vector<float> tw(chunk), cw(head_dim);
  for (float& w : tw) w = 1.0f + (rng.Next() % 1000) / 100.0f;
  for (float& w : cw) w = 1.0f + (rng.Next() % 1000) / 100.0f;

  std::printf(
      "# compress_bench\n\n- cpu model: %s\n- %lld tokens in chunks of %d, head_dim %d, "
      "fp16, sparsity %.2f, group %d, median of %d, one thread\n\n",
      CpuModel().c_str(), (long long)(chunks * chunk), chunk, head_dim, sparsity, group, iters);
  std::printf(
      "| direction | scoring | vectors/s | token rows/s | MB/s in (dense) |\n"
      "|---|---|---|---|---|\n");
  for (SectionKind kind : {SectionKind::kPerToken, SectionKind::kPerChannel}) {
    const SectionFormat f = kernels::MakeSectionFormat(kind, sparsity, head_dim, chunk, group, dt);
    std::vector<uint8_t> out(f.bytes());
    for (bool weighted : {false, true}) {
      std::vector<double> times;
      for (int it = 0; it < iters; ++it) {
        const double t0 = Now();
        for (int64_t c = 0; c < chunks; ++c) {
          kernels::CompressSection(f, x.data() + static_cast<size_t>(c) * chunk * head_dim * 2,
                                   weighted ? tw.data() : nullptr, weighted ? cw.data() : nullptr,
                                   out.data());
        }
        times.push_back(Now() - t0);
      }
      const double sec = Median(times);
      const double token_rows = static_cast<double>(chunks) * chunk;
      std::printf("| %s | %s | %.3g | %.3g | %.0f |\n",
                  kind == SectionKind::kPerToken ? "per-token" : "per-channel",
                  weighted ? "output-aware" : "magnitude", chunks * f.vectors() / sec,
                  token_rows / sec, token_rows * head_dim * 2 / sec / 1e6);
    }
  }
  return 0;
}

}  // namespace
}  // namespace sparsekv::bench

int main(int argc, char** argv) { return sparsekv::bench::Main(argc, argv); }
