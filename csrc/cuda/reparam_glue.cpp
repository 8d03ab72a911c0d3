// torch glue of the CUDA reparam + KL kernels (reparam.cu).
#include "glue.h"

namespace fastvae::cuda {

std::tuple<at::Tensor, at::Tensor> reparam_forward(const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& seed_t,
                                                   int64_t seed, int64_t k, bool need_kl, const OptTensor& flags) {
  check_latents(mu, logvar, at::kCUDA);
  TORCH_CHECK(k >= 1, "fastvae::reparam_forward: k must be >= 1, got ", k);
  const int64_t* seed_ptr = seed_pointer(seed_t, seed, mu.device());
  int32_t* word = flag_word(flags, mu.device());
  const c10::cuda::CUDAGuard guard(mu.device());
  auto z = new_output({k, mu.size(0), mu.size(1)}, mu.options());
  auto kl = new_output({need_kl ? mu.size(0) : 0}, mu.options());
  if (mu.numel() == 0) {  // no latents: each row's KL is an empty sum
    kl.zero_();
    return {z, kl};
  }
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_forward_cuda", [&] {
    check_launch(launch_reparam_forward(mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                        need_kl ? kl.data_ptr<scalar_t>() : nullptr, mu.size(0), mu.size(1), k, seed_ptr,
                                        static_cast<uint64_t>(seed), word, stream()));
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparam_backward(const at::Tensor& grad_z, const OptTensor& grad_kl, const at::Tensor& mu,
                                                    const at::Tensor& logvar, const at::Tensor& z, const OptTensor& seed_t,
                                                    int64_t seed, int64_t k) {
  check_latents(mu, logvar, at::kCUDA);
  const at::Tensor gk = check_reparam_backward(grad_z, grad_kl, mu, z, k);  // z: shape only, never read
  const int64_t* seed_ptr = seed_pointer(seed_t, seed, mu.device());
  const c10::cuda::CUDAGuard guard(mu.device());
  auto grad_mu = new_output(mu.sizes(), mu.options()), grad_logvar = new_output(mu.sizes(), mu.options());
  if (mu.numel() == 0) return {grad_mu, grad_logvar};
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_backward_cuda", [&] {
    check_launch(launch_reparam_backward(grad_z.data_ptr<scalar_t>(), gk.defined() ? gk.data_ptr<scalar_t>() : nullptr,
                                         mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), grad_mu.data_ptr<scalar_t>(),
                                         grad_logvar.data_ptr<scalar_t>(), mu.size(0), mu.size(1), k, seed_ptr,
                                         static_cast<uint64_t>(seed), stream()));
  });
  return {grad_mu, grad_logvar};
}

}  // namespace fastvae::cuda
