// Fused reconstruction + KL on the CPU: one pass per row over logits and targets writes the
// row's loss terms and, when asked, the gradients of sum(recon + beta * kl).
// Bernoulli from logits in torch's own form, (1 - x) l - min(l, 0) + log1p(exp(-|l|)), so
// NaN/Inf logits give what F.binary_cross_entropy_with_logits gives; grad sigmoid(l) - x.
// Gaussian: (l - x)^2, grad 2 (l - x). uint8 targets are read as x / 255.
#include "common.h"

namespace fastvae::cpu {

template <typename T, typename X>
struct LossArgs {
  const T* logits; const X* x; const T* mu; const T* logvar;
  T* recon; T* kl; T* grad_logits; T* grad_mu; T* grad_logvar;  // grads null when not needed
  int64_t rows, dim, latent; T beta; bool gaussian;
};

namespace FASTVAE_ISA {

// log1p(e) for e = exp(-|l|) in [0, 1] given u = 1 + e and inv = 1 / u. float: e * P(e), P the
// degree-9 Chebyshev fit of log1p(e) / e on [0, 1] (1.6e-7 relative in float32, checked in
// tests): ten FMAs instead of a vector log, the costliest step of the loss. double: log(u)
// corrected for u's rounding, log1p(e) = log(u) - (u - 1 - e) / u.
inline Vec<float> log1p_unit(const Vec<float>& e, const Vec<float>&, const Vec<float>&) {
  static constexpr float c[] = {1.0f, -0.49999893f, 0.3332971f, -0.24951616f, 0.19663274f,
                                -0.15269667f, 0.105436236f, -0.05637361f, 0.019542526f, -0.003176057f};
  Vec<float> p(c[9]);
  for (int k = 8; k >= 0; --k) p = at::vec::fmadd(p, e, Vec<float>(c[k]));
  return p * e;
}

inline Vec<double> log1p_unit(const Vec<double>& e, const Vec<double>& u, const Vec<double>& inv) {
  return u.log() - (u - Vec<double>(1) - e) * inv;
}

template <typename T>
T recon_row(const T* l, const T* x, int64_t n, bool gaussian, T* grad) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> zero(0), one(1);
  Vec<T> acc(0);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t c = std::min(W, n - j);
    const Vec<T> lv = load(l + j, c), xv = load(x + j, c);
    Vec<T> term, g;
    if (gaussian) {
      const Vec<T> d = lv - xv;
      term = d * d;
      g = d * Vec<T>(2);
    } else {
      // e = exp(-|l|) in [0, 1]; u = 1 + e gives sigmoid(l) = 1 / u or e / u. exp_u20 maps NaN to a
      // number: the gradient takes NaN back from l.
      const Vec<T> e = (zero - lv.abs()).exp_u20(), u = one + e, inv = one / u;
      term = (one - xv) * lv - at::vec::minimum(lv, zero) + log1p_unit(e, u, inv);
      g = Vec<T>::blendv(Vec<T>::blendv(e * inv, inv, lv >= zero) - xv, lv, lv != lv);
    }
    acc = acc + (c == W ? term : Vec<T>::set(zero, term, c));  // padded lanes would add log 2
    if (grad != nullptr) store(g, grad + j, c);
  }
  return sum_lanes(acc);
}

template <typename T, typename X>
void loss_forward(const LossArgs<T, X>& a) {
  const int64_t D = a.dim, L = a.latent;
  at::parallel_for(0, a.rows, std::max<int64_t>(1, 16384 / (D + L)), [&](int64_t b0, int64_t b1) {
    std::vector<T> xrow(std::is_same_v<X, T> ? 0 : D);
    for (int64_t r = b0; r < b1; ++r) {
      const T* x;
      if constexpr (std::is_same_v<X, T>) {
        x = a.x + r * D;
      } else {
        for (int64_t j = 0; j < D; ++j) xrow[j] = static_cast<T>(a.x[r * D + j]) / T(255);
        x = xrow.data();
      }
      const bool grads = a.grad_logits != nullptr;
      a.recon[r] = recon_row(a.logits + r * D, x, D, a.gaussian, grads ? a.grad_logits + r * D : nullptr);
      a.kl[r] = kl_row(a.mu + r * L, a.logvar + r * L, L, a.beta, grads ? a.grad_mu + r * L : nullptr,
                       grads ? a.grad_logvar + r * L : nullptr);
    }
  });
}

template void loss_forward<float, float>(const LossArgs<float, float>&);
template void loss_forward<float, uint8_t>(const LossArgs<float, uint8_t>&);
template void loss_forward<double, double>(const LossArgs<double, double>&);
template void loss_forward<double, uint8_t>(const LossArgs<double, uint8_t>&);

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include "../ops.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {
template <typename T, typename X> void loss_forward(const LossArgs<T, X>&);
}  // namespace avx2
#endif

LossOutputs loss_forward(const at::Tensor& logits, const at::Tensor& x_in, const at::Tensor& mu, const at::Tensor& logvar,
                         double beta, bool gaussian, bool need_grad) {
  const at::Tensor x = check_loss(logits, x_in, mu, logvar, at::kCPU);
  LossOutputs out = empty_loss_outputs(logits, mu, need_grad);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fastvae_loss_forward_cpu", [&] {
    auto run = [&](auto* xp) {
      using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      const LossArgs<scalar_t, X> args{logits.data_ptr<scalar_t>(), xp, mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(),
                                       std::get<0>(out).data_ptr<scalar_t>(), std::get<1>(out).data_ptr<scalar_t>(),
                                       need_grad ? std::get<2>(out).data_ptr<scalar_t>() : nullptr,
                                       need_grad ? std::get<3>(out).data_ptr<scalar_t>() : nullptr,
                                       need_grad ? std::get<4>(out).data_ptr<scalar_t>() : nullptr,
                                       logits.size(0), logits.size(1), mu.size(1), static_cast<scalar_t>(beta), gaussian};
      FASTVAE_CPU_RUN(loss_forward, args);
    };
    if (x.scalar_type() == at::kByte) run(x.data_ptr<uint8_t>()); else run(x.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace fastvae::cpu
#endif
