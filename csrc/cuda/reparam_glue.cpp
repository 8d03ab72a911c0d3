// torch glue of the CUDA reparam + KL kernels (reparam.cu).
#include "glue.h"

namespace fastvae::cuda {

std::tuple<at::Tensor, at::Tensor> reparam_forward(const at::Tensor& mu, const at::Tensor& logvar, int64_t seed, int64_t k) {
  check_latents(mu, logvar, at::kCUDA);
  TORCH_CHECK(k >= 1 && seed >= 0, "fastvae::reparam_forward: need k >= 1 and seed >= 0, got ", k, " and ", seed);
  const c10::cuda::CUDAGuard guard(mu.device());
  auto z = at::empty({k, mu.size(0), mu.size(1)}, mu.options());
  auto kl = at::empty({mu.size(0)}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_forward_cuda", [&] {
    check_launch(launch_reparam_forward(mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                        kl.data_ptr<scalar_t>(), mu.size(0), mu.size(1), k, static_cast<uint64_t>(seed),
                                        stream()));
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparam_backward(const at::Tensor& grad_z, const std::optional<at::Tensor>& grad_kl,
                                                    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& z) {
  check_latents(mu, logvar, at::kCUDA);
  const at::Tensor gk = check_reparam_backward(grad_z, grad_kl, mu, z);
  const c10::cuda::CUDAGuard guard(mu.device());
  auto grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(logvar);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_backward_cuda", [&] {
    check_launch(launch_reparam_backward(grad_z.data_ptr<scalar_t>(), gk.defined() ? gk.data_ptr<scalar_t>() : nullptr,
                                         mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                         grad_mu.data_ptr<scalar_t>(), grad_logvar.data_ptr<scalar_t>(), mu.size(0),
                                         mu.size(1), z.size(0), stream()));
  });
  return {grad_mu, grad_logvar};
}

}  // namespace fastvae::cuda
