// Fused reconstruction + KL on the GPU: one block per row reduces the row's loss terms and writes
// grad_logits (sigmoid(l) - x, or 2 (l - x)) and the KL gradients in the same pass. Same
// formulas as csrc/cpu/loss.cpp (torch's BCE-with-logits form, so NaN/Inf behave as in torch).
#include "common.cuh"

namespace fastvae::cuda {
namespace {

template <typename T, typename X>
__device__ __forceinline__ T target(X x) {
  if constexpr (sizeof(X) == 1) return static_cast<T>(x) / T(255); else return x;
}

template <typename T, typename X>
__global__ void loss_forward_kernel(const T* __restrict__ logits, const X* __restrict__ x, const T* __restrict__ mu,
                                    const T* __restrict__ logvar, T* __restrict__ recon, T* __restrict__ kl,
                                    T* __restrict__ grad_logits, T* __restrict__ grad_mu, T* __restrict__ grad_logvar,
                                    int64_t rows, int64_t dim, int64_t latent, T beta, bool gaussian) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T acc = 0;
    for (int64_t j = r * dim + threadIdx.x; j < (r + 1) * dim; j += blockDim.x) {
      const T l = logits[j], t = target<T>(x[j]);
      T g;
      if (gaussian) {
        acc += (l - t) * (l - t);
        g = T(2) * (l - t);
      } else {
        const T e = exp(-fabs(l));
        acc += (T(1) - t) * l - (l < T(0) ? l : T(0)) + log1p(e);
        g = sigmoid_from(l, e) - t;
      }
      if (grad_logits != nullptr) grad_logits[j] = g;
    }
    T kl_acc = 0;
    for (int64_t j = r * latent + threadIdx.x; j < (r + 1) * latent; j += blockDim.x) {
      const T m = mu[j], v = logvar[j], e = exp(v);
      kl_acc += T(1) + v - m * m - e;
      if (grad_mu != nullptr) {
        grad_mu[j] = beta * m;
        grad_logvar[j] = T(0.5) * beta * (e - T(1));
      }
    }
    acc = block_sum(acc);
    kl_acc = block_sum(kl_acc);
    if (threadIdx.x == 0) {
      recon[r] = acc;
      kl[r] = T(-0.5) * kl_acc;
    }
  }
}

}  // namespace

template <typename T, typename X>
cudaError_t launch_loss_forward(const T* logits, const X* x, const T* mu, const T* logvar, T* recon, T* kl,
                                T* grad_logits, T* grad_mu, T* grad_logvar, int64_t rows, int64_t dim, int64_t latent,
                                T beta, bool gaussian, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(rows < (int64_t(1) << 20) ? rows : (int64_t(1) << 20));
  loss_forward_kernel<T, X><<<blocks, kThreads, 0, stream>>>(logits, x, mu, logvar, recon, kl, grad_logits, grad_mu,
                                                             grad_logvar, rows, dim, latent, beta, gaussian);
  return cudaGetLastError();
}

#define FASTVAE_INSTANTIATE(T, X)                                                                                   \
  template cudaError_t launch_loss_forward<T, X>(const T*, const X*, const T*, const T*, T*, T*, T*, T*, T*, int64_t, \
                                                 int64_t, int64_t, T, bool, cudaStream_t);
FASTVAE_INSTANTIATE(float, float)
FASTVAE_INSTANTIATE(float, uint8_t)
FASTVAE_INSTANTIATE(double, double)
FASTVAE_INSTANTIATE(double, uint8_t)
#undef FASTVAE_INSTANTIATE

}  // namespace fastvae::cuda
