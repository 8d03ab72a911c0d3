// Fused reconstruction + KL on the CPU: one pass per row over logits and targets writes the
// row's loss terms, checks the values it reads (flags.h) and, when asked, writes the gradients of
// scale * sum(recon + beta * kl) (the mean's 1/B folded in as `scale`).
// Bernoulli from logits in torch's own form, (1 - x) l - min(l, 0) + log1p(exp(-|l|)), so
// NaN/Inf logits give what F.binary_cross_entropy_with_logits gives; grad sigmoid(l) - x.
// Gaussian: (l - x)^2, grad 2 (l - x). uint8 targets are read as x / 255, converted in registers.
#include "args.h"
#include "common.h"

namespace fastvae::cpu {

namespace FASTVAE_ISA {

// log1p(e) for e = exp(-|l|) in [0, 1] given u = 1 + e and inv = 1 / u. float: e * P(e), P the
// degree-9 Chebyshev fit of log1p(e) / e on [0, 1] (1.6e-7 relative in float32, checked in
// tests): a dozen FMAs instead of a vector log, the costliest step of the loss. double: log(u)
// corrected for u's rounding, log1p(e) = log(u) - (u - 1 - e) / u.
inline Vec<float> log1p_unit(const Vec<float>& e, const Vec<float>&, const Vec<float>&) {
  static constexpr float c[] = {1.0f, -0.49999893f, 0.3332971f, -0.24951616f, 0.19663274f,
                                -0.15269667f, 0.105436236f, -0.05637361f, 0.019542526f, -0.003176057f};
  using V = Vec<float>;  // Estrin's scheme: a shorter dependency chain than Horner's (7% of the loss here)
  const V e2 = e * e, e4 = e2 * e2;
  const V p01 = at::vec::fmadd(V(c[1]), e, V(c[0])), p23 = at::vec::fmadd(V(c[3]), e, V(c[2]));
  const V p45 = at::vec::fmadd(V(c[5]), e, V(c[4])), p67 = at::vec::fmadd(V(c[7]), e, V(c[6]));
  const V p89 = at::vec::fmadd(V(c[9]), e, V(c[8]));
  const V q0 = at::vec::fmadd(p23, e2, p01), q1 = at::vec::fmadd(p67, e2, p45);
  return at::vec::fmadd(at::vec::fmadd(p89, e4, q1), e4, q0) * e;
}

inline Vec<double> log1p_unit(const Vec<double>& e, const Vec<double>& u, const Vec<double>& inv) {
  return u.log() - (u - Vec<double>(1) - e) * inv;
}

// `count` targets as T: floats as they are, bytes / 255 (the reference's x.to(dtype) / 255).
template <typename T>
inline Vec<T> load_target(const T* p, int64_t count) {
  return load(p, count);
}

template <typename T>
inline Vec<T> load_target(const uint8_t* p, int64_t count) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> v;
#if defined(CPU_CAPABILITY_AVX2)
  __m128i bytes;
  if (count == W) {
    if constexpr (W == 8) bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    else bytes = _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(p));  // unaligned int32 load
  } else {
    alignas(16) uint8_t tail[16] = {};
    std::copy(p, p + count, tail);
    bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
  }
  if constexpr (std::is_same_v<T, float>) v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  else v = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(bytes));
#else
  alignas(32) T tmp[W] = {};
  for (int64_t j = 0; j < count; ++j) tmp[j] = static_cast<T>(p[j]);
  v = Vec<T>::loadu(tmp);
#endif
  return v / Vec<T>(255);
}

// The value checks of one parallel task (one per tensor; x only when it is floating point).
template <typename T>
struct LossCheck {
  FiniteCheck<T> logits, x;
  RangeCheck<T> x_range;
  LatentCheck<T> latent;
  int bits(bool float_x, bool gaussian) const {
    int b = (logits.bad() ? FLAG_LOGITS_NONFINITE : 0) | latent.bits();
    if (float_x) b |= (x.bad() ? FLAG_X_NONFINITE : 0) | (!gaussian && x_range.outside(T(0), T(1)) ? FLAG_X_RANGE : 0);
    return b;
  }
};

template <bool kGaussian, bool kCheck, typename T, typename X>
T recon_row(const T* l, const X* x, int64_t n, T scale, T* grad, LossCheck<T>& check) {
  constexpr int64_t W = Vec<T>::size();
  constexpr bool kFloatX = std::is_same_v<X, T>;
  const Vec<T> zero(0), one(1);
  Vec<T> acc(0);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t c = std::min(W, n - j);
    const Vec<T> lv = load(l + j, c), xv = load_target<T>(x + j, c);
    if constexpr (kCheck) {
      check.logits.add(lv);
      if constexpr (kFloatX) {
        check.x.add(xv);
        if constexpr (!kGaussian) check.x_range.add(xv);
      }
    }
    Vec<T> term, g;
    if constexpr (kGaussian) {
      const Vec<T> d = lv - xv;
      term = d * d;
      g = d * Vec<T>(2 * scale);
    } else {
      // e = exp(-|l|) in [0, 1]; u = 1 + e gives sigmoid(l) = 1 / u or e / u. exp_u20 maps NaN to a
      // number: the gradient takes NaN back from l (and the term from (1 - x) l).
      const Vec<T> e = (zero - lv.abs()).exp_u20(), u = one + e, inv = one / u;
      term = (one - xv) * lv - min_keep(lv, zero) + log1p_unit(e, u, inv);
      g = Vec<T>::blendv(Vec<T>::blendv(e * inv, inv, lv >= zero) - xv, lv, lv != lv) * Vec<T>(scale);
    }
    acc = acc + (c == W ? term : Vec<T>::set(zero, term, c));  // padded lanes would add log 2
    if (grad != nullptr) store(g, grad + j, c);
  }
  return sum_lanes(acc);
}

template <bool kGaussian, bool kCheck, typename T, typename X>
void loss_rows(const LossArgs<T, X>& a) {
  const int64_t D = a.dim, L = a.latent;
  const bool grads = a.grad_logits != nullptr;
  at::parallel_for(0, a.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D + L)), [&](int64_t b0, int64_t b1) {
    LossCheck<T> check;
    for (int64_t r = b0; r < b1; ++r) {
      a.recon[r] = recon_row<kGaussian, kCheck>(a.logits + r * D, a.x + r * D, D, a.scale,
                                                grads ? a.grad_logits + r * D : nullptr, check);
      a.kl[r] = kl_row(a.mu + r * L, a.logvar + r * L, L, kCheck ? &check.latent : nullptr, a.scale * a.beta,
                       grads ? a.grad_mu + r * L : nullptr, grads ? a.grad_logvar + r * L : nullptr);
    }
    if constexpr (kCheck) a.flags->add(check.bits(std::is_same_v<X, T>, kGaussian));
  });
}

template <typename T, typename X>
void loss_forward(const LossArgs<T, X>& a) {
  const bool check = a.flags != nullptr;
  if (a.gaussian) {
    check ? loss_rows<true, true>(a) : loss_rows<true, false>(a);
  } else {
    check ? loss_rows<false, true>(a) : loss_rows<false, false>(a);
  }
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
LossOutputs loss_forward(const at::Tensor& logits, const at::Tensor& x_in, const at::Tensor& mu, const at::Tensor& logvar,
                         const OptTensor& beta_t, double beta, bool gaussian, bool need_grad, double scale,
                         const OptTensor& flags) {
  const at::Tensor x = check_loss(logits, x_in, mu, logvar, at::kCPU);
  const double* beta_p = beta_pointer(beta_t, logits.device());
  const double kl_weight = beta_p != nullptr ? *beta_p : beta;  // a CPU tensor: read on the host
  int32_t* word = flag_word(flags, logits.device());
  LossOutputs out = empty_loss_outputs(logits, mu, need_grad);
  FlagSink sink;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fastvae_loss_forward_cpu", [&] {
    auto run = [&](auto* xp) {
      using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      const LossArgs<scalar_t, X> args{logits.data_ptr<scalar_t>(), xp, mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(),
                                       std::get<0>(out).data_ptr<scalar_t>(), std::get<1>(out).data_ptr<scalar_t>(),
                                       need_grad ? std::get<2>(out).data_ptr<scalar_t>() : nullptr,
                                       need_grad ? std::get<3>(out).data_ptr<scalar_t>() : nullptr,
                                       need_grad ? std::get<4>(out).data_ptr<scalar_t>() : nullptr,
                                       logits.size(0), logits.size(1), mu.size(1), static_cast<scalar_t>(kl_weight),
                                       static_cast<scalar_t>(scale), gaussian, word != nullptr ? &sink : nullptr};
      FASTVAE_CPU_RUN(loss_forward, args);
    };
    if (x.scalar_type() == at::kByte) run(x.data_ptr<uint8_t>()); else run(x.data_ptr<scalar_t>());
  });
  sink.commit(word);
  return out;
}

// The upstream gradient read on the host: a 0-dim 1 touches nothing.
void scale_grads(const at::Tensor& grad_out, at::TensorList grads) {
  check_scale_grads(grad_out, grads, at::kCPU);
  if (grad_out.dim() == 0) {
    if (grad_out.item<double>() == 1.0) return;
    for (const at::Tensor& g : grads) g.mul_(grad_out);
    return;
  }
  for (const at::Tensor& g : grads) {
    std::vector<int64_t> shape(g.dim(), 1);
    shape[0] = grad_out.numel();
    g.mul_(grad_out.view(shape));
  }
}

}  // namespace fastvae::cpu
#endif
