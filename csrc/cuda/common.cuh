// Device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include "kernels.h"

namespace fastvae::cuda {

// Sum of `v` over the block (blockDim.x a multiple of 32, <= 1024); the result in every thread.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `partial` may still be read from a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += partial[w];
  return total;
}

// sigmoid(l) from e = exp(-|l|), without overflow; NaN stays NaN.
template <typename T>
__device__ __forceinline__ T sigmoid_from(T l, T e) {
  const T inv = T(1) / (T(1) + e);
  return l >= T(0) ? inv : e * inv;
}

}  // namespace fastvae::cuda
