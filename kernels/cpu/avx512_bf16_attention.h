// bf16 dot-product kernels of the AVX-512 decode attention (DecodeCompute::kBFloat16), for
// fp16 and bf16 caches on CPUs with AVX512_BF16 (AMD Zen 4/5, Intel Cooper Lake, Sapphire
// Rapids): q . K and p . V of per-token and dense rows. Per-channel sections and fp32 caches
// stay on the fp32 path. Internal to avx512_attention.cc.
//
// Why: the fp32 sparse path is compute-bound (tests/bench/RESULTS.md sections 1 and 12): per 32
// columns of a row it spends an expand, an extract, two 2-uop conversions and 2 * group FMAs.
// vdpbf16ps does 32 multiplies into 16 fp32 lanes and takes the expanded word of a bf16 row as
// it is; on CPUs without AVX512-FP16 it is the only packed arithmetic narrower than fp32.
//   K: one vdpbf16ps per head and row word (two with q's hi + lo split).
//   V: two rows per vdpbf16ps: their words interleaved per channel, times the weight pair.
//   fp16 rows become bf16 through integer instructions (AsBf16 in the .cc: the value is
//   x * 2^-112, folded into q and the weights).
//
// Numerics (measured in RESULTS.md section 12):
//   bf16 caches: q * scale and the softmax weights are split into bf16 hi + lo (error <= 2^-18
//     relative); products of bf16 values are exact in fp32 and every sum is fp32, so results are
//     within a few 1e-6 of the fp32 path's.
//   fp16 caches: K and V are rounded to bf16 (8-bit significand, unit roundoff 2^-9), as are
//     q * scale and the weights (l sums the rounded weights, so they stay normalised); fp16
//     subnormals (|x| < 6.1e-5) count as zero. Output error ~3e-3 relative on real K/V.
// vdpbf16ps treats denormal inputs as zero; otherwise only values below 1.2e-38 are affected.
// A K block with a non-finite score (inf/NaN in q or K, or fp32 overflow) and a V slice with
// inf/NaN are recomputed in fp32, which gives the fp32 path's semantics.
#ifndef SPARSEKV_KERNELS_CPU_AVX512_BF16_ATTENTION_H_
#define SPARSEKV_KERNELS_CPU_AVX512_BF16_ATTENTION_H_

#include "kernels/cpu/avx512_common.h"

#ifdef SPARSEKV_HAVE_AVX512_VARIANT

namespace sparsekv::kernels::avx512_detail {

// Built with AVX512_BF16 intrinsics and the CPU has AVX512_BF16.
bool Bf16ArithmeticAvailable();

// Sets w->bf16 (after w->Reset(p)) when p asks for kBFloat16, the cache is fp16 or bf16 and
// this build and CPU have AVX512_BF16; then fills w->qb_hi and w->qb_lo.
void PrepareBf16(const DecodeAttentionParams& p, Work* w);

// w->p[h, 0..rows) = bf16 dot-product scores of rb's rows (dtype: the cache's, fp16 or bf16)
// for every head of the group. False when any score is non-finite: the caller recomputes the
// block in fp32.
bool Bf16RowScores(const RowBlock& rb, int rows, DType dtype, Work* w);

// Rounds one head's block weights s[0..kBlock) (exp(score - m), zero past the rows) for the
// bf16 V kernel over rows of `dtype`: writes them as bf16 pairs of consecutive rows to
// pairs[0..32) and, for bf16 rows, the rounding remainders' pairs to pairs[32..64). For fp16
// rows s is rounded in place instead, so that l sums exactly the weights the kernel multiplies
// with. Returns the sum of s.
float Bf16Weights(float* s, uint32_t* pairs, DType dtype);

// w->acc += p . V over rb's rows (dtype: fp16 or bf16) from the pairs Bf16Weights wrote to
// w->p16; bf16 caches use the lo pairs too.
void Bf16RowValues(const RowBlock& rb, int rows, DType dtype, Work* w);

}  // namespace sparsekv::kernels::avx512_detail

#endif  // SPARSEKV_HAVE_AVX512_VARIANT
#endif  // SPARSEKV_KERNELS_CPU_AVX512_BF16_ATTENTION_H_
