// torch glue of the CUDA loss and scale_grads kernels (loss.cu).
#include "glue.h"

namespace fastvae::cuda {

LossOutputs loss_forward(const at::Tensor& logits, const at::Tensor& x_in, const at::Tensor& mu, const at::Tensor& logvar,
                         const OptTensor& beta_t, double beta, bool gaussian, bool need_grad, double scale,
                         const OptTensor& flags) {
  const at::Tensor x = check_loss(logits, x_in, mu, logvar, at::kCUDA);
  const double* beta_ptr = beta_pointer(beta_t, logits.device());
  int32_t* word = flag_word(flags, logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  LossOutputs out = empty_loss_outputs(logits, mu, need_grad);
  if (logits.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fastvae_loss_forward_cuda", [&] {
    auto grad = [&](const at::Tensor& t) { return need_grad ? t.data_ptr<scalar_t>() : nullptr; };
    auto run = [&](auto* xp) {
      check_launch(launch_loss_forward(logits.data_ptr<scalar_t>(), xp, mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(),
                                       std::get<0>(out).data_ptr<scalar_t>(), std::get<1>(out).data_ptr<scalar_t>(),
                                       grad(std::get<2>(out)), grad(std::get<3>(out)), grad(std::get<4>(out)),
                                       logits.size(0), logits.size(1), mu.size(1), beta_ptr, beta, scale, gaussian, word,
                                       stream()));
    };
    if (x.scalar_type() == at::kByte) run(static_cast<const uint8_t*>(x.data_ptr<uint8_t>()));
    else run(static_cast<const scalar_t*>(x.data_ptr<scalar_t>()));
  });
  return out;
}

void scale_grads(const at::Tensor& grad_out, at::TensorList grads) {
  check_scale_grads(grad_out, grads, at::kCUDA);
  if (grads.empty()) return;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g_out = grad_out.contiguous();
  const bool per_row = g_out.dim() == 1;
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type(), "fastvae: scale_grads takes grads of one dtype");
  }
  // a few waves: returning at once (the scalar 1) costs about one wave of empty blocks
  const int max_blocks = 4 * multiprocessors(grad_out.get_device());
  AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "fastvae_scale_grads_cuda", [&] {
    for (size_t first = 0; first < grads.size(); first += kMaxScaled) {
      ScaledTensors<scalar_t> list{};
      for (size_t i = first; i < std::min(grads.size(), first + kMaxScaled); ++i, ++list.count) {
        const at::Tensor& g = grads[i];
        list.data[list.count] = g.data_ptr<scalar_t>();
        list.numel[list.count] = g.numel();
        list.row_len[list.count] = per_row && g.size(0) > 0 ? g.numel() / g.size(0) : 1;
      }
      if (g_out.scalar_type() == at::kDouble) {
        check_launch(launch_scale_grads(g_out.data_ptr<double>(), per_row, list, max_blocks, stream()));
      } else {
        check_launch(launch_scale_grads(g_out.data_ptr<float>(), per_row, list, max_blocks, stream()));
      }
    }
  });
}

}  // namespace fastvae::cuda
