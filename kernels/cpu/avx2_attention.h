// The AVX2 variant of decode attention (AVX2, FMA, F16C, BMI2, POPCNT), fp32 arithmetic:
// compressed rows are expanded 8 columns at a time by table-driven shuffles (one per bitmap
// byte), fp16 converted with F16C, bf16 by a 16-bit shift; all query heads of the GQA group
// share each expanded K/V row; the online softmax runs per block of up to 64 tokens, and the
// next block is prefetched while one computes.
//
// Specialised: dense and per-token sections and dense spans in fp16, bf16 and fp32;
// per-channel sections fall back to row_source.h's float expansion.
// REQUIRES (callers): GetCpuFeatures().avx2. Thread-safe (scratch is thread-local).
#ifndef SPARSEKV_KERNELS_CPU_AVX2_ATTENTION_H_
#define SPARSEKV_KERNELS_CPU_AVX2_ATTENTION_H_

#include "kernels/attention.h"

namespace sparsekv::kernels {

// Whether this build contains the variant (x86-64 with GCC or Clang).
bool Avx2AttentionCompiled();

// See Backend::DecodeAttentionPartial.
void Avx2DecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_AVX2_ATTENTION_H_
