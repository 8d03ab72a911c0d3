// Shared by the CUDA glue files: torch tensors in, kernel launchers (kernels.h) out.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "kernels.h"

namespace fastvae::cuda {

inline void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fastvae: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Streaming multiprocessors of `device` (an attribute query: no sync, fine during graph capture).
inline int multiprocessors(int device) {
  int count = 0;
  check_launch(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace fastvae::cuda
