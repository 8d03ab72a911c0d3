// The one registration file: op schemas (torch.ops.fastvae.*), their CPU and CUDA kernels, and
// the Python module fastvae._C (whether the CUDA kernels were built; the value-check flag bits).
//
// seed_t / beta_t: a 0-dim tensor on the op's device that the kernel reads instead of the int seed /
// float beta (CUDA: from device memory, so CUDA graphs replay with fresh values; CPU: on the host).
// flags: the value-check flag word (flags.h) the kernels OR bits into; None turns the checks off.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fastvae, m) {
  m.def("reparam_forward(Tensor mu, Tensor logvar, Tensor? seed_t, int seed, int k, bool need_kl, Tensor(a!)? flags)"
        " -> (Tensor, Tensor)");
  m.def("reparam_backward(Tensor grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor z, Tensor? seed_t, int seed,"
        " int k) -> (Tensor, Tensor)");
  m.def("loss_forward(Tensor logits, Tensor x, Tensor mu, Tensor logvar, Tensor? beta_t, float beta, bool gaussian,"
        " bool need_grad, float scale, Tensor(a!)? flags) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_grads(Tensor grad_out, Tensor(a!)[] grads) -> ()");
  m.def("to_image(Tensor values, Tensor(a!) out, bool from_logits) -> ()");
}

#define FASTVAE_IMPL(ns)                             \
  m.impl("reparam_forward", &ns::reparam_forward);   \
  m.impl("reparam_backward", &ns::reparam_backward); \
  m.impl("loss_forward", &ns::loss_forward);         \
  m.impl("scale_grads", &ns::scale_grads);           \
  m.impl("to_image", &ns::to_image);

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { FASTVAE_IMPL(fastvae::cpu) }

#ifdef FASTVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { FASTVAE_IMPL(fastvae::cuda) }
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("with_cuda") = kWithCuda;
  pybind11::dict flags;
  for (const auto& f : fastvae::kFlagNames) flags[f.name] = f.bit;
  m.attr("FLAGS") = flags;
  m.attr("MAX_LOGVAR") = fastvae::MAX_LOGVAR;
  m.def("_philox_words", &fastvae::cpu::philox_words, "test hook: Philox words (counters, 4) of the running CPU copy");
  m.def("_philox_normals", &fastvae::cpu::philox_normals, "test hook: the CUDA kernels' scalar normals, run on the host");
  m.def("_poison_outputs", &fastvae::poison_outputs, "test hook: fill every output the ops allocate with NaN first");
  m.def("_force_isa", &fastvae::cpu::force_isa, "test hook: -1 CPU capability decides, 0 baseline copy, 1 AVX2 copy");
}
