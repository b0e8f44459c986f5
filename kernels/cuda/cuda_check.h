// CUDA_OK(expr): for test and benchmark programs (not the library, whose launchers return
// cudaError_t): prints the failing call with its location and error, and exits 1.
#ifndef SPARSEKV_KERNELS_CUDA_CUDA_CHECK_H_
#define SPARSEKV_KERNELS_CUDA_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

#define CUDA_OK(expr)                                                                             \
  do {                                                                                            \
    const cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

#endif  // SPARSEKV_KERNELS_CUDA_CUDA_CHECK_H_
