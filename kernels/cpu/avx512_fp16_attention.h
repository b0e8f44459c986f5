// fp16-arithmetic row kernels of the AVX-512 decode attention (DecodeCompute::kFloat16), for
// fp16 caches on CPUs with AVX512-FP16. Per-token and dense rows only; per-channel sections
// and other dtypes stay on the fp32 path. Internal to avx512_attention.cc.
//
// Why: the fp32 sparse path is compute-bound (tests/bench/RESULTS.md): per 32 columns of a row
// it spends an expand, an extract, two 2-uop conversions and 2 * group FMAs. With AVX512-FP16
// the expanded fp16 word feeds `group` 32-lane FMAs directly: no conversion, half the FMAs.
//
// Numerics (the error this adds on real K/V is measured in RESULTS.md):
//   K: q * scale rounded to fp16 (as GPU kernels do); each lane sums head_dim / 32 products in
//      fp16, the two 16-lane halves of a row are added in fp16, the rest of the reduction is fp32.
//   V: p rounded to fp16 (SoftmaxBlock sums the rounded values into l, so the weights stay
//      normalised); p * v summed over one block (<= 64 rows) in fp16, then added in fp32.
// fp16 overflow (a partial sum beyond 65504) gives inf or NaN; both are detected per block and
// the block (for V: the slice of heads and words) is recomputed in fp32, so range never makes a
// result silently wrong.
// Non-finite inputs take the same route and so get the fp32 path's semantics.
#ifndef SPARSEKV_KERNELS_CPU_AVX512_FP16_ATTENTION_H_
#define SPARSEKV_KERNELS_CPU_AVX512_FP16_ATTENTION_H_

#include "kernels/cpu/avx512_common.h"

#ifdef SPARSEKV_HAVE_AVX512_VARIANT

namespace sparsekv::kernels::avx512_detail {

// Built with AVX512-FP16 intrinsics and the CPU has AVX512-FP16.
bool Fp16ArithmeticAvailable();

// Sets w->f16 (after w->Reset(p)) when p asks for kFloat16, the cache is fp16, this build and
// CPU have AVX512-FP16 and every q * scale fits fp16; then fills w->q16 and sizes the buffers.
void PrepareFp16(const DecodeAttentionParams& p, Work* w);

// w->p[h, 0..rows) = fp16-arithmetic scores of rb's rows for every head of the group. False
// when any score is non-finite: the caller recomputes the block in fp32.
bool Fp16RowScores(const RowBlock& rb, int rows, Work* w);

// w->acc += p . V over rb's rows: w->p16 holds the weights as fp16 pairs and w->p the same
// (fp16-exact) values as floats, both zero past `rows` (SoftmaxBlock with round_f16). A slice
// of heads and words whose fp16 sums are not all finite is recomputed in fp32 here.
void Fp16RowValues(const RowBlock& rb, int rows, Work* w);

}  // namespace sparsekv::kernels::avx512_detail

#endif  // SPARSEKV_HAVE_AVX512_VARIANT
#endif  // SPARSEKV_KERNELS_CPU_AVX512_FP16_ATTENTION_H_
