// Launchers of the CUDA kernels: plain pointers and a stream, no torch headers (so nvcc compiles
// the .cu files quickly); the torch glue lives in *_glue.cpp. Explicit instantiations: T is
// float or double, X (targets) T or uint8_t, O (image) T or uint8_t, G (upstream gradient) float
// or double.
//
// Device scalars: `seed_ptr` (int64) and `beta_ptr` (float64), when not null, are read by the
// kernels from device memory instead of `seed` / `beta`, so that CUDA graphs replay with fresh
// values. `flags`, when not null, is the value-check flag word (flags.h). No launcher syncs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastvae::cuda {

// z (k, rows, dim) and, when `kl` is not null, the KL rows.
template <typename T>
cudaError_t launch_reparam_forward(const T* mu, const T* logvar, T* z, T* kl, int64_t rows, int64_t dim, int64_t k,
                                   const int64_t* seed_ptr, uint64_t seed, int32_t* flags, cudaStream_t stream);

// eps drawn again from (seed, index): z is not read. grad_kl may be null (no KL gradient).
template <typename T>
cudaError_t launch_reparam_backward(const T* grad_z, const T* grad_kl, const T* mu, const T* logvar, T* grad_mu,
                                    T* grad_logvar, int64_t rows, int64_t dim, int64_t k, const int64_t* seed_ptr,
                                    uint64_t seed, cudaStream_t stream);

// The gradients (null when not needed) are those of scale * sum(recon + beta * kl).
template <typename T, typename X>
cudaError_t launch_loss_forward(const T* logits, const X* x, const T* mu, const T* logvar, T* recon, T* kl,
                                T* grad_logits, T* grad_mu, T* grad_logvar, int64_t rows, int64_t dim, int64_t latent,
                                const double* beta_ptr, double beta, double scale, bool gaussian, int32_t* flags,
                                cudaStream_t stream);

// Up to kMaxScaled tensors scaled in place by one launch.
constexpr int kMaxScaled = 4;
template <typename T>
struct ScaledTensors {
  T* data[kMaxScaled];
  int64_t numel[kMaxScaled];
  int64_t row_len[kMaxScaled];  // elements per row (per-row grad_out)
  int count;
};

// Every tensor times grad_out: one factor (per_row false; the kernel returns at once when it is 1)
// or grad_out[row]. `max_blocks` bounds the grid (a few waves of the device).
template <typename T, typename G>
cudaError_t launch_scale_grads(const G* grad_out, bool per_row, const ScaledTensors<T>& tensors, int max_blocks,
                               cudaStream_t stream);

// uint8 pixels of sigmoid(values) (from_logits) or values.
template <typename T>
cudaError_t launch_to_image(const T* values, uint8_t* out, int64_t n, bool from_logits, cudaStream_t stream);

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

inline unsigned int grid_for(int64_t work, int64_t cap = int64_t(1) << 16) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace fastvae::cuda
