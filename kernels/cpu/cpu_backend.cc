// CPU backend. Only the scalar path exists so far; SIMD variants (AVX2, AVX-512) will be chosen
// here from CPU features at start-up, with the scalar reference as their oracle.
#include "kernels/backend.h"

namespace sparsekv::kernels {
namespace {

class ScalarCpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string variant() const override { return "scalar"; }
  void DecodeAttention(const DecodeAttentionParams& p) const override {
    ReferenceDecodeAttention(p);
  }
};

}  // namespace

const Backend& CpuBackend() {
  static const ScalarCpuBackend* backend = new ScalarCpuBackend();
  return *backend;
}

}  // namespace sparsekv::kernels
