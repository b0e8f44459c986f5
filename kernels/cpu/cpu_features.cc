#include "kernels/cpu/cpu_features.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels/backend.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define SPARSEKV_X86 1
#endif

namespace sparsekv::kernels {
namespace {

#ifdef SPARSEKV_X86
struct Regs {
  uint32_t a = 0, b = 0, c = 0, d = 0;
};

Regs CpuId(uint32_t leaf, uint32_t sub) {
  Regs r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}

uint64_t XGetBv(uint32_t index) {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(index));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

std::string Brand() {
  if (__get_cpuid_max(0x80000000u, nullptr) < 0x80000004u) return "unknown";
  char brand[49] = {};
  for (uint32_t i = 0; i < 3; ++i) {
    const Regs r = CpuId(0x80000002u + i, 0);
    std::memcpy(brand + 16 * i, &r, 16);
  }
  std::string s(brand);
  const size_t first = s.find_first_not_of(' ');
  if (first == std::string::npos) return "unknown";
  return s.substr(first, s.find_last_not_of(' ') - first + 1);  // vendors pad either end
}
#endif

CpuFeatures Detect() {
  CpuFeatures f;
#ifdef SPARSEKV_X86
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  const Regs l1 = CpuId(1, 0);
  const Regs l7 = CpuId(7, 0);
  const Regs l71 = CpuId(7, 1);
  const bool osxsave = (l1.c >> 27) & 1;
  if (!osxsave) return f;
  const uint64_t xcr0 = XGetBv(0);
  const bool ymm_state = (xcr0 & 0x6) == 0x6;    // SSE + AVX state
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool avx = (l1.c >> 28) & 1;
  const bool fma = (l1.c >> 12) & 1;
  const bool f16c = (l1.c >> 29) & 1;
  const bool popcnt = (l1.c >> 23) & 1;
  const bool avx2 = (l7.b >> 5) & 1;
  const bool bmi2 = (l7.b >> 8) & 1;
  f.avx2 = ymm_state && avx && avx2 && fma && f16c && popcnt && bmi2;
  const bool avx512f = (l7.b >> 16) & 1;
  const bool avx512dq = (l7.b >> 17) & 1;
  const bool avx512bw = (l7.b >> 30) & 1;
  const bool avx512vl = (l7.b >> 31) & 1;
  const bool avx512vbmi2 = (l7.c >> 6) & 1;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && avx512vbmi2;
  f.avx512_fp16 = f.avx512 && ((l7.d >> 23) & 1);
  f.avx512_bf16 = f.avx512 && ((l71.a >> 5) & 1);
#endif
  const char* cap = std::getenv("SPARSEKV_CPU_VARIANT");
  if (cap != nullptr) {
    if (std::strcmp(cap, "portable") == 0) f = CpuFeatures();
    if (std::strcmp(cap, "avx2") == 0) f.avx512 = f.avx512_fp16 = f.avx512_bf16 = false;
  }
  return f;
}

}  // namespace

const CpuFeatures& GetCpuFeatures() {
  static const CpuFeatures features = Detect();
  return features;
}

std::string CpuFeaturesSummary() {
  const CpuFeatures& f = GetCpuFeatures();
  std::string s = "cpu: ";
#ifdef SPARSEKV_X86
  s += Brand();
#else
  s += "non-x86";
#endif
  s += " |";
  if (f.avx2) s += " avx2 fma f16c bmi2";
  if (f.avx512) s += " avx512f/bw/vl/dq/vbmi2";
  if (f.avx512_fp16) s += " avx512fp16";
  if (f.avx512_bf16) s += " avx512bf16";
  if (!f.avx2) s += " (no SIMD variant usable)";
  s += " | variant " + CpuBackend().variant();
  return s;
}

}  // namespace sparsekv::kernels
