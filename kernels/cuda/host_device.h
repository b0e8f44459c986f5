// SPARSEKV_HOST_DEVICE: marks small geometry helpers that the host plan and device code of
// kernels/cuda share (__host__ __device__ under nvcc, nothing in host-only files).
#ifndef SPARSEKV_KERNELS_CUDA_HOST_DEVICE_H_
#define SPARSEKV_KERNELS_CUDA_HOST_DEVICE_H_

#if defined(__CUDACC__)
#define SPARSEKV_HOST_DEVICE __host__ __device__
#else
#define SPARSEKV_HOST_DEVICE
#endif

#endif  // SPARSEKV_KERNELS_CUDA_HOST_DEVICE_H_
