// The arguments of the CPU kernels (one struct per kernel), and the kernels' declarations in both
// ISA copies (common.h: FASTVAE_CPU_RUN picks one), so that one op can run another op's kernel
// (mlp_step.cpp runs reparam's and loss's inside the training step).
#pragma once

#include <cstdint>

namespace fastvae::cpu {

class FlagSink;

template <typename T>
struct ReparamForwardArgs {
  const T* mu; const T* logvar; T* z; T* kl;  // kl null when not needed
  int64_t rows, dim, k; uint64_t seed;
  FlagSink* flags;  // null: no value checks
};

template <typename T>
struct ReparamBackwardArgs {
  const T* grad_z; const T* grad_kl; const T* mu; const T* logvar; const T* z;  // grad_kl may be null
  T* grad_mu; T* grad_logvar;
  int64_t rows, dim, k;
};

template <typename T, typename X>
struct LossArgs {
  const T* logits; const X* x; const T* mu; const T* logvar;
  T* recon; T* kl; T* grad_logits; T* grad_mu; T* grad_logvar;  // grads null when not needed
  int64_t rows, dim, latent; T beta, scale; bool gaussian;
  FlagSink* flags;  // null: no value checks
};

enum class Activation : int { kNone, kRelu };

template <typename T>
struct BiasActArgs {
  T* out; const T* bias;  // out[r] = act(out[r] + bias) for every row r
  int64_t rows, cols; Activation act;
};

#define FASTVAE_CPU_KERNEL_DECLARATIONS                                    \
  template <typename T> void reparam_forward(const ReparamForwardArgs<T>&);   \
  template <typename T> void reparam_backward(const ReparamBackwardArgs<T>&); \
  template <typename T, typename X> void loss_forward(const LossArgs<T, X>&); \
  template <typename T> void bias_act(const BiasActArgs<T>&);
namespace base { FASTVAE_CPU_KERNEL_DECLARATIONS }
namespace avx2 { FASTVAE_CPU_KERNEL_DECLARATIONS }
#undef FASTVAE_CPU_KERNEL_DECLARATIONS

}  // namespace fastvae::cpu
