// Entry points of the fastvae ops (registered in ops.cpp) and the argument checks the CPU and
// CUDA glue share (checks.cpp). Python validates user input first; these checks guard the
// kernels' assumptions (device, dtype, contiguity, shapes).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "flags.h"

namespace fastvae {

// recon_rows, kl_rows, grad_logits, grad_mu, grad_logvar (the gradients empty when not needed)
using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

void check_latents(const at::Tensor& mu, const at::Tensor& logvar, at::DeviceType device);
// grad_kl as a contiguous tensor of the KL rows' dtype, or an undefined tensor when absent.
at::Tensor check_reparam_backward(const at::Tensor& grad_z, const OptTensor& grad_kl, const at::Tensor& mu,
                                  const at::Tensor& z, int64_t k);
// x as the kernels read it: uint8, or contiguous in logits' dtype.
at::Tensor check_loss(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                      at::DeviceType device);
LossOutputs empty_loss_outputs(const at::Tensor& logits, const at::Tensor& mu, bool need_grad);
// A fresh output tensor; NaN-filled (ints: -7) while the poison_outputs test hook is on, so that an
// element a kernel forgets to write shows up.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);
void poison_outputs(bool on);
// Where the kernel writes: `out` itself, or a temporary in values' dtype to copy into `out`.
at::Tensor check_to_image(const at::Tensor& values, const at::Tensor& out, at::DeviceType device);

// The seed tensor (0-dim int64 on `device`), if given; checks the int seed otherwise.
const int64_t* seed_pointer(const OptTensor& seed_t, int64_t seed, const at::Device& device);
// The seed the CPU kernels use: the tensor's value (read on the host) or the int.
uint64_t host_seed(const OptTensor& seed_t, int64_t seed);
// The beta tensor (0-dim float64 on `device`), if given.
const double* beta_pointer(const OptTensor& beta_t, const at::Device& device);
// The flag word (int32, shape (1,), on `device`), or null when value checks are off.
int32_t* flag_word(const OptTensor& flags, const at::Device& device);
// scale_grads' arguments: grad_out 0-dim or (B,) of a float dtype; every grad (B, ...) contiguous.
void check_scale_grads(const at::Tensor& grad_out, at::TensorList grads, at::DeviceType device);

#define FASTVAE_OP_DECLARATIONS                                                                                     \
  std::tuple<at::Tensor, at::Tensor> reparam_forward(const at::Tensor& mu, const at::Tensor& logvar,                \
                                                     const OptTensor& seed_t, int64_t seed, int64_t k, bool need_kl, \
                                                     const OptTensor& flags);                                       \
  std::tuple<at::Tensor, at::Tensor> reparam_backward(const at::Tensor& grad_z, const OptTensor& grad_kl,           \
                                                      const at::Tensor& mu, const at::Tensor& logvar,               \
                                                      const at::Tensor& z, const OptTensor& seed_t, int64_t seed,   \
                                                      int64_t k);                                                   \
  LossOutputs loss_forward(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& mu,                      \
                           const at::Tensor& logvar, const OptTensor& beta_t, double beta, bool gaussian,           \
                           bool need_grad, double scale, const OptTensor& flags);                                   \
  void scale_grads(const at::Tensor& grad_out, at::TensorList grads);                                               \
  void to_image(const at::Tensor& values, at::Tensor& out, bool from_logits);

namespace cpu {
FASTVAE_OP_DECLARATIONS
// Test hooks (fastvae._C): the Philox words (counters, 4) as the running CPU copy computes them, and
// which copy runs (-1: by CPU capability, 0: baseline, 1: AVX2 where the CPU has it).
at::Tensor philox_words(int64_t seed, int64_t first, int64_t counters);
// The GPU kernels' scalar path (philox.h's philox_normals_at), compiled for the host: stream values first .. first + n - 1.
at::Tensor philox_normals(int64_t seed, int64_t first, int64_t n);
void force_isa(int which);
}  // namespace cpu
namespace cuda { FASTVAE_OP_DECLARATIONS }

}  // namespace fastvae
