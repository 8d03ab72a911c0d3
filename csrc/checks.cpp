// Argument checks shared by the CPU and CUDA glue (see ops.h).
#include "ops.h"

#include <atomic>
#include <limits>

namespace fastvae {
namespace {
std::atomic<bool> poison{false};

// The tensor an optional argument holds; nullptr when it is absent or undefined.
const at::Tensor* given(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

void check_device_type(const char* name, const at::Tensor& t, at::DeviceType device) {
  TORCH_CHECK(t.defined(), "fastvae: ", name, " is undefined");
  TORCH_CHECK(t.device().type() == device, "fastvae: ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
}

void check_tensor(const char* name, const at::Tensor& t, at::DeviceType device) {
  check_device_type(name, t, device);
  TORCH_CHECK(t.is_contiguous(), "fastvae: ", name, " must be contiguous; call .contiguous()");
}

void check_on(const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "fastvae: ", name, " must be on ", device, " (the op's device), got ", t.device());
}

void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastvae: the C++/CUDA kernels take float32 or float64 ", name, ", got ", t.scalar_type());
}

void check_scalar(const char* name, const at::Tensor& t, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == dtype, "fastvae: ", name, " must be a 0-dim ", dtype,
              " tensor, got shape ", t.sizes(), " and ", t.scalar_type());
  check_on(name, t, device);
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

at::Tensor check_reparam_backward(const at::Tensor& grad_z, const OptTensor& grad_kl, const at::Tensor& mu,
                                  const at::Tensor& z, int64_t k) {
  check_tensor("grad_z", grad_z, mu.device().type());
  check_tensor("z", z, mu.device().type());
  TORCH_CHECK(z.dim() == 3 && z.size(0) == k && z.size(1) == mu.size(0) && z.size(2) == mu.size(1) &&
                  grad_z.sizes() == z.sizes(),
              "fastvae: z and grad_z must be (k=", k, ", batch, latent) matching mu ", mu.sizes(), ", got ", z.sizes(),
              " and ", grad_z.sizes());
  TORCH_CHECK(z.scalar_type() == mu.scalar_type() && grad_z.scalar_type() == mu.scalar_type(),
              "fastvae: z and grad_z must have mu's dtype");
  const at::Tensor* g = given(grad_kl);
  if (g == nullptr) return at::Tensor();
  TORCH_CHECK(g->numel() == mu.size(0), "fastvae: grad_kl must hold one value per row, got ", g->sizes());
  return g->to(mu.device(), mu.scalar_type()).contiguous();
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

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison.load(std::memory_order_relaxed)) {
    t.fill_(at::isFloatingType(t.scalar_type()) ? std::numeric_limits<double>::quiet_NaN() : -7.0);
  }
  return t;
}

void poison_outputs(bool on) { poison.store(on); }

LossOutputs empty_loss_outputs(const at::Tensor& logits, const at::Tensor& mu, bool need_grad) {
  const int64_t rows = logits.size(0);
  auto grad = [&](const at::Tensor& like) { return new_output(need_grad ? like.sizes() : at::IntArrayRef{0}, like.options()); };
  return {new_output({rows}, logits.options()), new_output({rows}, logits.options()), grad(logits), grad(mu), grad(mu)};
}

at::Tensor check_to_image(const at::Tensor& values, const at::Tensor& out, at::DeviceType device) {
  check_tensor("values", values, device);
  check_on("out", out, values.device());
  check_float("values", values);
  TORCH_CHECK(out.sizes() == values.sizes(), "fastvae: out must have values' shape ", values.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kByte, "fastvae: to_image writes uint8 images, got out of ", out.scalar_type(),
              " (a float output is torch.sigmoid's)");
  return out.is_contiguous() ? out : at::empty(values.sizes(), values.options().dtype(at::kByte));
}

const int64_t* seed_pointer(const OptTensor& seed_t, int64_t seed, const at::Device& device) {
  const at::Tensor* t = given(seed_t);
  if (t == nullptr) {
    TORCH_CHECK(seed >= 0, "fastvae: seed must be >= 0, got ", seed);
    return nullptr;
  }
  check_scalar("seed_t", *t, at::kLong, device);
  return t->const_data_ptr<int64_t>();
}

uint64_t host_seed(const OptTensor& seed_t, int64_t seed) {
  const int64_t* p = seed_pointer(seed_t, seed, at::Device(at::kCPU));
  const int64_t value = p != nullptr ? *p : seed;
  TORCH_CHECK(value >= 0, "fastvae: seed_t must hold a seed >= 0, got ", value);
  return static_cast<uint64_t>(value);
}

const double* beta_pointer(const OptTensor& beta_t, const at::Device& device) {
  const at::Tensor* t = given(beta_t);
  if (t == nullptr) return nullptr;
  check_scalar("beta_t", *t, at::kDouble, device);
  return t->const_data_ptr<double>();
}

int32_t* flag_word(const OptTensor& flags, const at::Device& device) {
  const at::Tensor* t = given(flags);
  if (t == nullptr) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kInt && t->numel() == 1 && t->dim() == 1,
              "fastvae: flags must be an int32 tensor of shape (1,), got ", t->scalar_type(), " ", t->sizes());
  check_on("flags", *t, device);
  return t->data_ptr<int32_t>();
}

void check_scale_grads(const at::Tensor& grad_out, at::TensorList grads, at::DeviceType device) {
  check_device_type("grad_out", grad_out, device);
  check_float("grad_out", grad_out);
  TORCH_CHECK(grad_out.dim() <= 1, "fastvae: grad_out must be 0-dim or (batch,), got ", grad_out.sizes());
  for (const at::Tensor& g : grads) {
    check_tensor("grads[i]", g, device);
    check_float("grads[i]", g);
    check_on("grads[i]", g, grad_out.device());
    TORCH_CHECK(grad_out.dim() == 0 || (g.dim() >= 1 && g.size(0) == grad_out.numel()),
                "fastvae: a per-row grad_out ", grad_out.sizes(), " needs grads of ", grad_out.numel(), " rows, got ",
                g.sizes());
  }
}

}  // namespace fastvae
