// What rejecting non-finite input costs: kernels::FindUnstorable over a request's K/V against
// the conversion the append does anyway (fp32 -> fp16 store, and a same-dtype copy), on the
// same bytes in the same run. Prints a markdown table with GB/s and the check's cost as a
// fraction of the conversion.
//
//   finite_check_bench [--mib 64] [--iters 9]
#include <cstdio>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/finite_check.h"
#include "tests/bench/bench_util.h"

namespace sparsekv::bench {
namespace {

template <typename F>
double Seconds(int iters, F f) {
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const double t0 = Now();
    f();
    t.push_back(Now() - t0);
  }
  return Median(t);
}

int Main(int argc, char** argv) {
  const size_t mib = static_cast<size_t>(IntFlag(argc, argv, "mib", 64));
  const int iters = static_cast<int>(IntFlag(argc, argv, "iters", 9));
  const size_t n = mib * (1u << 20) / sizeof(float);
  Rng rng(1);
  std::vector<float> f32(n);
  for (float& x : f32) x = static_cast<float>(rng.Normal());
  std::vector<uint16_t> f16(n), out16(n);
  kernels::ConvertElements(kernels::DType::kFloat32, f32.data(), kernels::DType::kFloat16,
                           f16.data(), n);
  std::vector<float> out32(n);
  volatile int64_t sink = 0;

  struct Row {
    const char* what;
    double bytes, check_s, convert_s;
  };
  std::vector<Row> rows;
  rows.push_back({"fp32 request, fp16 storage", n * 4.0,
                  Seconds(iters,
                          [&] {
                            sink = kernels::FindUnstorable(kernels::DType::kFloat32, f32.data(), n,
                                                           kernels::DType::kFloat16);
                          }),
                  Seconds(iters, [&] {
                    kernels::ConvertElements(kernels::DType::kFloat32, f32.data(),
                                             kernels::DType::kFloat16, out16.data(), n);
                  })});
  rows.push_back({"fp16 request, fp16 storage (copy)", n * 2.0,
                  Seconds(iters,
                          [&] {
                            sink = kernels::FindUnstorable(kernels::DType::kFloat16, f16.data(), n,
                                                           kernels::DType::kFloat16);
                          }),
                  Seconds(iters, [&] {
                    kernels::ConvertElements(kernels::DType::kFloat16, f16.data(),
                                             kernels::DType::kFloat16, out16.data(), n);
                  })});
  rows.push_back({"fp32 request, fp32 storage (copy)", n * 4.0,
                  Seconds(iters,
                          [&] {
                            sink = kernels::FindUnstorable(kernels::DType::kFloat32, f32.data(), n,
                                                           kernels::DType::kFloat32);
                          }),
                  Seconds(iters, [&] {
                    kernels::ConvertElements(kernels::DType::kFloat32, f32.data(),
                                             kernels::DType::kFloat32, out32.data(), n);
                  })});
  if (sink != -1) {
    std::fprintf(stderr, "unexpected non-finite value at %lld\n", static_cast<long long>(sink));
    return 1;
  }
  std::printf("%zu MiB of request values, median of %d; %s\n\n", mib, iters, CpuModel().c_str());
  std::printf("| input -> storage | check GB/s | store GB/s | check / store time |\n");
  std::printf("|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %.1f | %.1f | %.2f |\n", r.what, r.bytes / r.check_s * 1e-9,
                r.bytes / r.convert_s * 1e-9, r.check_s / r.convert_s);
  }
  return 0;
}

}  // namespace
}  // namespace sparsekv::bench

int main(int argc, char** argv) { return sparsekv::bench::Main(argc, argv); }
