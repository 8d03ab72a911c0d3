// Argument checks shared by the CPU and CUDA glue (see ops.h).
#include "ops.h"

namespace fastvae {
namespace {
void check_tensor(const char* name, const at::Tensor& t, at::DeviceType device) {
  TORCH_CHECK(t.defined(), "fastvae: ", name, " is undefined");
  TORCH_CHECK(t.device().type() == device, "fastvae: ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fastvae: ", name, " must be contiguous; call .contiguous()");
}

void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastvae: the C++/CUDA kernels take float32 or float64 ", name, ", got ", t.scalar_type());
}
}  // namespace

void check_latents(const at::Tensor& mu, const at::Tensor& logvar, at::DeviceType device) {
  check_tensor("mu", mu, device);
  check_tensor("logvar", logvar, device);
  check_float("mu", mu);
  TORCH_CHECK(mu.dim() == 2 && mu.sizes() == logvar.sizes(), "fastvae: mu and logvar must be (batch, latent) of one shape, got ",
              mu.sizes(), " and ", logvar.sizes());
  TORCH_CHECK(mu.scalar_type() == logvar.scalar_type(), "fastvae: mu and logvar must share a dtype");
}

at::Tensor check_reparam_backward(const at::Tensor& grad_z, const std::optional<at::Tensor>& grad_kl,
                                  const at::Tensor& mu, const at::Tensor& z) {
  check_tensor("grad_z", grad_z, mu.device().type());
  check_tensor("z", z, mu.device().type());
  TORCH_CHECK(z.dim() == 3 && z.size(1) == mu.size(0) && z.size(2) == mu.size(1) && grad_z.sizes() == z.sizes(),
              "fastvae: z and grad_z must be (k, batch, latent) matching mu ", mu.sizes(), ", got ", z.sizes(), " and ",
              grad_z.sizes());
  TORCH_CHECK(z.scalar_type() == mu.scalar_type() && grad_z.scalar_type() == mu.scalar_type(),
              "fastvae: z and grad_z must have mu's dtype");
  if (!grad_kl.has_value() || !grad_kl->defined()) return at::Tensor();
  TORCH_CHECK(grad_kl->numel() == mu.size(0), "fastvae: grad_kl must hold one value per row, got ", grad_kl->sizes());
  return grad_kl->to(mu.device(), mu.scalar_type()).contiguous();
}

at::Tensor check_loss(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                      at::DeviceType device) {
  check_tensor("logits", logits, device);
  check_tensor("x", x, device);
  check_float("logits", logits);
  check_latents(mu, logvar, device);
  TORCH_CHECK(logits.dim() == 2 && x.sizes() == logits.sizes(), "fastvae: logits and x must be (batch, features) of one shape, got ",
              logits.sizes(), " and ", x.sizes());
  TORCH_CHECK(mu.size(0) == logits.size(0), "fastvae: mu and logits must have the same batch size");
  TORCH_CHECK(mu.scalar_type() == logits.scalar_type(), "fastvae: mu and logits must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kByte || x.is_floating_point(), "fastvae: x must be floating point or uint8");
  return x.scalar_type() == at::kByte ? x : x.to(logits.scalar_type());
}

LossOutputs empty_loss_outputs(const at::Tensor& logits, const at::Tensor& mu, bool need_grad) {
  const int64_t rows = logits.size(0);
  auto grad = [&](const at::Tensor& like) { return need_grad ? at::empty_like(like) : at::empty({0}, like.options()); };
  return {at::empty({rows}, logits.options()), at::empty({rows}, logits.options()), grad(logits), grad(mu), grad(mu)};
}

at::Tensor check_to_image(const at::Tensor& values, const at::Tensor& out, at::DeviceType device) {
  check_tensor("values", values, device);
  TORCH_CHECK(out.device() == values.device(), "fastvae: out must be on values' device");
  check_float("values", values);
  TORCH_CHECK(out.sizes() == values.sizes(), "fastvae: out must have values' shape ", values.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kByte || out.is_floating_point(), "fastvae: out must be uint8 or floating point");
  const bool direct = out.is_contiguous() && (out.scalar_type() == at::kByte || out.scalar_type() == values.scalar_type());
  return direct ? out : at::empty(values.sizes(), values.options().dtype(out.scalar_type() == at::kByte ? at::kByte : values.scalar_type()));
}

}  // namespace fastvae
