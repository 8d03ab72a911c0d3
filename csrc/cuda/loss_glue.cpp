// torch glue of the CUDA loss kernel (loss.cu).
#include "glue.h"

namespace fastvae::cuda {

LossOutputs loss_forward(const at::Tensor& logits, const at::Tensor& x_in, const at::Tensor& mu, const at::Tensor& logvar,
                         double beta, bool gaussian, bool need_grad) {
  const at::Tensor x = check_loss(logits, x_in, mu, logvar, at::kCUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  LossOutputs out = empty_loss_outputs(logits, mu, need_grad);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fastvae_loss_forward_cuda", [&] {
    auto grad = [&](const at::Tensor& t) { return need_grad ? t.data_ptr<scalar_t>() : nullptr; };
    auto run = [&](auto* xp) {
      check_launch(launch_loss_forward(logits.data_ptr<scalar_t>(), xp, mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(),
                                       std::get<0>(out).data_ptr<scalar_t>(), std::get<1>(out).data_ptr<scalar_t>(),
                                       grad(std::get<2>(out)), grad(std::get<3>(out)), grad(std::get<4>(out)),
                                       logits.size(0), logits.size(1), mu.size(1), static_cast<scalar_t>(beta), gaussian,
                                       stream()));
    };
    if (x.scalar_type() == at::kByte) run(static_cast<const uint8_t*>(x.data_ptr<uint8_t>()));
    else run(static_cast<const scalar_t*>(x.data_ptr<scalar_t>()));
  });
  return out;
}

}  // namespace fastvae::cuda
