// The one registration file: op schemas (torch.ops.fastvae.*), their CPU and CUDA kernels, and
// the Python module fastvae._C (which only says whether the CUDA kernels were built).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fastvae, m) {
  m.def("reparam_forward(Tensor mu, Tensor logvar, int seed, int k) -> (Tensor, Tensor)");
  m.def("reparam_backward(Tensor grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor z) -> (Tensor, Tensor)");
  m.def("loss_forward(Tensor logits, Tensor x, Tensor mu, Tensor logvar, float beta, bool gaussian, bool need_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("to_image(Tensor values, Tensor(a!) out, bool from_logits) -> ()");
}

#define FASTVAE_IMPL(ns)                           \
  m.impl("reparam_forward", &ns::reparam_forward); \
  m.impl("reparam_backward", &ns::reparam_backward); \
  m.impl("loss_forward", &ns::loss_forward);       \
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
}
