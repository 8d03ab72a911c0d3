// Fused reparameterisation + KL on the GPU. Forward: each thread takes Philox counters (4
// consecutive elements of z, eps never stored) and rows of the KL; backward is elementwise
// over (batch, latent), summing the k samples.
#include "../philox.h"
#include "common.cuh"

namespace fastvae::cuda {
namespace {

template <typename T>
__global__ void reparam_forward_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, T* __restrict__ z,
                                       T* __restrict__ kl, int64_t rows, int64_t dim, int64_t k, uint64_t seed) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_sample = rows * dim, total = k * per_sample;
  for (int64_t c = tid; 4 * c < total; c += stride) {
    float eps[4];
    philox_normal4(seed, static_cast<uint64_t>(c), eps);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = 4 * c + lane;
      if (i < total) {
        const int64_t j = i % per_sample;
        z[i] = mu[j] + static_cast<T>(eps[lane]) * exp(T(0.5) * logvar[j]);
      }
    }
  }
  for (int64_t r = tid; r < rows; r += stride) {
    T acc = 0;
    for (int64_t j = r * dim; j < (r + 1) * dim; ++j) acc += T(1) + logvar[j] - mu[j] * mu[j] - exp(logvar[j]);
    kl[r] = T(-0.5) * acc;
  }
}

template <typename T>
__global__ void reparam_backward_kernel(const T* __restrict__ grad_z, const T* __restrict__ grad_kl,
                                        const T* __restrict__ mu, const T* __restrict__ logvar, const T* __restrict__ z,
                                        T* __restrict__ grad_mu, T* __restrict__ grad_logvar, int64_t rows, int64_t dim,
                                        int64_t k) {
  const int64_t n = rows * dim, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T m = mu[i], gk = grad_kl != nullptr ? grad_kl[i / dim] : T(0);
    T gm = gk * m, gl = 0;
    for (int64_t s = 0; s < k; ++s) {
      const T g = grad_z[s * n + i];
      gm += g;
      gl += g * (z[s * n + i] - m);
    }
    grad_mu[i] = gm;
    grad_logvar[i] = T(0.5) * (gl + gk * (exp(logvar[i]) - T(1)));
  }
}

}  // namespace

template <typename T>
cudaError_t launch_reparam_forward(const T* mu, const T* logvar, T* z, T* kl, int64_t rows, int64_t dim, int64_t k,
                                   uint64_t seed, cudaStream_t stream) {
  const int64_t counters = (k * rows * dim + 3) / 4;
  reparam_forward_kernel<T><<<grid_for(counters > rows ? counters : rows), kThreads, 0, stream>>>(mu, logvar, z, kl, rows,
                                                                                                   dim, k, seed);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_reparam_backward(const T* grad_z, const T* grad_kl, const T* mu, const T* logvar, const T* z,
                                    T* grad_mu, T* grad_logvar, int64_t rows, int64_t dim, int64_t k, cudaStream_t stream) {
  reparam_backward_kernel<T><<<grid_for(rows * dim), kThreads, 0, stream>>>(grad_z, grad_kl, mu, logvar, z, grad_mu,
                                                                           grad_logvar, rows, dim, k);
  return cudaGetLastError();
}

#define FASTVAE_INSTANTIATE(T)                                                                                    \
  template cudaError_t launch_reparam_forward<T>(const T*, const T*, T*, T*, int64_t, int64_t, int64_t, uint64_t, \
                                                 cudaStream_t);                                                   \
  template cudaError_t launch_reparam_backward<T>(const T*, const T*, const T*, const T*, const T*, T*, T*,       \
                                                  int64_t, int64_t, int64_t, cudaStream_t);
FASTVAE_INSTANTIATE(float)
FASTVAE_INSTANTIATE(double)
#undef FASTVAE_INSTANTIATE

}  // namespace fastvae::cuda
