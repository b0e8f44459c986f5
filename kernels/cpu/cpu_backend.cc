// CPU backend: the variants this machine supports, the best chosen once from CPU features.
// Every SIMD variant has the portable variant as its fallback and the scalar reference as its
// oracle (tests/kernels).
#include <algorithm>
#include <cstdio>

#include "kernels/backend.h"
#include "kernels/cpu/avx2_attention.h"
#include "kernels/cpu/avx512_attention.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/portable_attention.h"

namespace sparsekv::kernels {
namespace {

class PortableCpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string variant() const override { return "portable"; }
  std::string features() const override { return CpuFeaturesSummary(); }
  void DecodeAttentionPartial(const DecodeAttentionParams& p,
                              AttentionState* state) const override {
    PortableDecodeAttentionPartial(p, state);
  }
};

class Avx2CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string variant() const override { return "avx2"; }
  std::string features() const override { return CpuFeaturesSummary(); }
  void DecodeAttentionPartial(const DecodeAttentionParams& p,
                              AttentionState* state) const override {
    Avx2DecodeAttentionPartial(p, state);
  }
};

class Avx512CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string variant() const override { return "avx512"; }
  std::string features() const override { return CpuFeaturesSummary(); }
  void DecodeAttentionPartial(const DecodeAttentionParams& p,
                              AttentionState* state) const override {
    Avx512DecodeAttentionPartial(p, state);
  }
  bool Fp16Arithmetic() const override { return Avx512Fp16ArithmeticAvailable(); }
  bool Bf16Arithmetic() const override { return Avx512Bf16ArithmeticAvailable(); }
};

}  // namespace

std::vector<const Backend*> CpuBackendVariants() {
  // Built once; the objects live for the whole program (Backends are immutable).
  static const std::vector<const Backend*>* variants = [] {
    auto* v = new std::vector<const Backend*>();
    v->push_back(new PortableCpuBackend());
    const CpuFeatures& f = GetCpuFeatures();
    if (f.avx2 && Avx2AttentionCompiled()) v->push_back(new Avx2CpuBackend());
    if (f.avx512 && Avx512AttentionCompiled()) v->push_back(new Avx512CpuBackend());
    return v;
  }();
  return *variants;
}

const Backend& CpuBackend() { return *CpuBackendVariants().back(); }

void DecodeAttention(const Backend& backend, const DecodeAttentionParams& p) {
  AttentionState state;
  backend.DecodeAttentionPartial(p, &state);
  FinalizeAttentionState(state, p.out, p.lse);
}

}  // namespace sparsekv::kernels
