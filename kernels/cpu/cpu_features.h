// Run-time detection of the x86 instruction-set extensions the SIMD kernel variants use,
// checked through cpuid and, for the wider registers, xgetbv (the OS must save their state).
//
// Detection runs once, on first use; thread-safe.
#ifndef SPARSEKV_KERNELS_CPU_CPU_FEATURES_H_
#define SPARSEKV_KERNELS_CPU_CPU_FEATURES_H_

#include <string>

namespace sparsekv::kernels {

struct CpuFeatures {
  bool avx2 = false;    // with FMA, F16C, BMI2, POPCNT and OS-enabled YMM state
  bool avx512 = false;  // F, BW, VL, DQ, VBMI2 (vpexpandw) on top of avx2, OS-enabled ZMM state
  bool avx512_fp16 = false;  // on top of avx512: DecodeCompute::kFloat16 arithmetic
  bool avx512_bf16 = false;  // on top of avx512: DecodeCompute::kBFloat16 dot products
};

// The features of this machine. Setting SPARSEKV_CPU_VARIANT=portable|avx2 in the environment
// caps what is reported (for testing fallbacks and comparing variants in production).
const CpuFeatures& GetCpuFeatures();

// One line for logs: the CPU brand, the detected extensions and the variant in use, e.g.
// "cpu: Intel(R) Xeon(R) ... | avx2 fma f16c bmi2 avx512f/bw/vl/dq/vbmi2 | variant avx512".
std::string CpuFeaturesSummary();

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_CPU_FEATURES_H_
