// The AVX-512 variant of decode attention (F, BW, VL, DQ, VBMI2): compressed rows are
// expanded in registers with vpexpandw (the 32-bit bitmap words are the masks) and converted
// with vcvtph2ps, all query heads of the GQA group share each expanded K/V row, and the
// online softmax runs per block of up to 64 tokens (one rescale per block).
//
// Specialised: dense, per-token and per-channel (group 32 or 64) sections and dense spans in
// fp16, bf16 and fp32. Anything else falls back to row_source.h's float expansion.
// REQUIRES (callers): GetCpuFeatures().avx512. Thread-safe (scratch is thread-local).
#ifndef SPARSEKV_KERNELS_CPU_AVX512_ATTENTION_H_
#define SPARSEKV_KERNELS_CPU_AVX512_ATTENTION_H_

#include "kernels/attention.h"

namespace sparsekv::kernels {

// Whether this build contains the variant (x86-64 with GCC or Clang).
bool Avx512AttentionCompiled();

// Whether DecodeCompute::kFloat16 takes effect: built with AVX512-FP16 support and the CPU
// has it (avx512_fp16_attention.h).
bool Avx512Fp16ArithmeticAvailable();

// Whether DecodeCompute::kBFloat16 takes effect: built with AVX512_BF16 support and the CPU
// has it (avx512_bf16_attention.h).
bool Avx512Bf16ArithmeticAvailable();

// See Backend::DecodeAttentionPartial.
void Avx512DecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_AVX512_ATTENTION_H_
