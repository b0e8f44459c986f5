// The portable (plain C++) float32 variant of decode attention.
#ifndef SPARSEKV_KERNELS_CPU_PORTABLE_ATTENTION_H_
#define SPARSEKV_KERNELS_CPU_PORTABLE_ATTENTION_H_

#include "kernels/attention.h"

namespace sparsekv::kernels {

// See Backend::DecodeAttentionPartial.
void PortableDecodeAttentionPartial(const DecodeAttentionParams& p, AttentionState* state);

}  // namespace sparsekv::kernels

#endif  // SPARSEKV_KERNELS_CPU_PORTABLE_ATTENTION_H_
