// Launchers of the CUDA kernels: plain pointers and a stream, no torch headers (so nvcc compiles
// the .cu files quickly); the torch glue lives in *_glue.cpp. Explicit instantiations: T is
// float or double, X (targets) T or uint8_t, O (image) T or uint8_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastvae::cuda {

template <typename T>
cudaError_t launch_reparam_forward(const T* mu, const T* logvar, T* z, T* kl, int64_t rows, int64_t dim, int64_t k,
                                   uint64_t seed, cudaStream_t stream);

// grad_kl may be null (no KL gradient).
template <typename T>
cudaError_t launch_reparam_backward(const T* grad_z, const T* grad_kl, const T* mu, const T* logvar, const T* z,
                                    T* grad_mu, T* grad_logvar, int64_t rows, int64_t dim, int64_t k, cudaStream_t stream);

// The gradients are null when not needed.
template <typename T, typename X>
cudaError_t launch_loss_forward(const T* logits, const X* x, const T* mu, const T* logvar, T* recon, T* kl,
                                T* grad_logits, T* grad_mu, T* grad_logvar, int64_t rows, int64_t dim, int64_t latent,
                                T beta, bool gaussian, cudaStream_t stream);

template <typename T, typename O>
cudaError_t launch_to_image(const T* values, O* out, int64_t n, bool from_logits, cudaStream_t stream);

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t work, int64_t cap = int64_t(1) << 16) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace fastvae::cuda
