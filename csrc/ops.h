// Entry points of the fastvae ops (registered in ops.cpp) and the argument checks the CPU and
// CUDA glue share (checks.cpp). Python validates user input first; these checks guard the
// kernels' assumptions (device, dtype, contiguity, shapes).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastvae {

// recon_rows, kl_rows, grad_logits, grad_mu, grad_logvar (the gradients empty when not needed)
using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_latents(const at::Tensor& mu, const at::Tensor& logvar, at::DeviceType device);
// grad_kl as a contiguous tensor of mu's dtype, or an undefined tensor when absent.
at::Tensor check_reparam_backward(const at::Tensor& grad_z, const std::optional<at::Tensor>& grad_kl,
                                  const at::Tensor& mu, const at::Tensor& z);
// x as the kernels read it: uint8, or contiguous in logits' dtype.
at::Tensor check_loss(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                      at::DeviceType device);
LossOutputs empty_loss_outputs(const at::Tensor& logits, const at::Tensor& mu, bool need_grad);
// Where the kernel writes: `out` itself, or a temporary in values' dtype to copy into `out`.
at::Tensor check_to_image(const at::Tensor& values, const at::Tensor& out, at::DeviceType device);

#define FASTVAE_OP_DECLARATIONS                                                                                     \
  std::tuple<at::Tensor, at::Tensor> reparam_forward(const at::Tensor& mu, const at::Tensor& logvar, int64_t seed,   \
                                                     int64_t k);                                                    \
  std::tuple<at::Tensor, at::Tensor> reparam_backward(const at::Tensor& grad_z, const std::optional<at::Tensor>& grad_kl, \
                                                      const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& z); \
  LossOutputs loss_forward(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& mu,                      \
                           const at::Tensor& logvar, double beta, bool gaussian, bool need_grad);                   \
  void to_image(const at::Tensor& values, at::Tensor& out, bool from_logits);

namespace cpu { FASTVAE_OP_DECLARATIONS }
namespace cuda { FASTVAE_OP_DECLARATIONS }

}  // namespace fastvae
