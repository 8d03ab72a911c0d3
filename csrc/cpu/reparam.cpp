// Fused reparameterisation + KL on the CPU: z = mu + exp(0.5 logvar) * eps for k samples with eps
// drawn from Philox per tile (never stored), and the per-row KL, in one pass over mu and logvar.
#include "common.h"

namespace fastvae::cpu {

template <typename T>
struct ReparamForwardArgs {
  const T* mu; const T* logvar; T* z; T* kl;
  int64_t rows, dim, k; uint64_t seed;
};

template <typename T>
struct ReparamBackwardArgs {
  const T* grad_z; const T* grad_kl; const T* mu; const T* logvar; const T* z;  // grad_kl may be null
  T* grad_mu; T* grad_logvar;
  int64_t rows, dim, k;
};

namespace FASTVAE_ISA {

constexpr int64_t kTile = 2048;  // elements of mu per tile: eps and std buffers stay in L1/L2

template <typename T>
void reparam_forward(const ReparamForwardArgs<T>& a) {
  const int64_t L = a.dim, BL = a.rows * a.dim, tile_rows = std::max<int64_t>(1, kTile / L);
  at::parallel_for(0, a.rows, tile_rows, [&](int64_t b0, int64_t b1) {
    std::vector<T> stdev(tile_rows * L), eps(tile_rows * L);
    for (int64_t r0 = b0; r0 < b1; r0 += tile_rows) {
      const int64_t r1 = std::min(b1, r0 + tile_rows), n = (r1 - r0) * L, base = r0 * L;
      for (int64_t r = r0; r < r1; ++r) a.kl[r] = kl_row(a.mu + r * L, a.logvar + r * L, L);
      at::vec::map([](Vec<T> v) { return (v * Vec<T>(0.5)).exp(); }, stdev.data(), a.logvar + base, n);
      for (int64_t s = 0; s < a.k; ++s) {
        fill_randn(a.seed, static_cast<uint64_t>(s * BL + base), n, eps.data());
        at::vec::map3([](Vec<T> m, Vec<T> e, Vec<T> sd) { return m + e * sd; },
                      a.z + s * BL + base, a.mu + base, eps.data(), stdev.data(), n);
      }
    }
  });
}

// grad_mu = sum_s grad_z + grad_kl mu; grad_logvar = 0.5 sum_s grad_z (z - mu) + grad_kl 0.5 (exp(lv) - 1).
template <typename T>
void reparam_backward(const ReparamBackwardArgs<T>& a) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t L = a.dim, BL = a.rows * a.dim;
  at::parallel_for(0, a.rows, std::max<int64_t>(1, 4096 / L), [&](int64_t b0, int64_t b1) {
    for (int64_t r = b0; r < b1; ++r) {
      const Vec<T> gk(a.grad_kl != nullptr ? a.grad_kl[r] : T(0));
      for (int64_t j = r * L, end = (r + 1) * L; j < end; j += W) {
        const int64_t c = std::min(W, end - j);
        const Vec<T> m = load(a.mu + j, c), v = load(a.logvar + j, c);
        Vec<T> gm = gk * m, gl(0);
        for (int64_t s = 0; s < a.k; ++s) {
          const Vec<T> g = load(a.grad_z + s * BL + j, c);
          gm = gm + g;
          gl = gl + g * (load(a.z + s * BL + j, c) - m);
        }
        store(gm, a.grad_mu + j, c);
        store((gl + gk * (v.exp() - Vec<T>(1))) * Vec<T>(0.5), a.grad_logvar + j, c);
      }
    }
  });
}

template void reparam_forward<float>(const ReparamForwardArgs<float>&);
template void reparam_forward<double>(const ReparamForwardArgs<double>&);
template void reparam_backward<float>(const ReparamBackwardArgs<float>&);
template void reparam_backward<double>(const ReparamBackwardArgs<double>&);

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include "../ops.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {
template <typename T> void reparam_forward(const ReparamForwardArgs<T>&);
template <typename T> void reparam_backward(const ReparamBackwardArgs<T>&);
}  // namespace avx2
#endif

std::tuple<at::Tensor, at::Tensor> reparam_forward(const at::Tensor& mu, const at::Tensor& logvar, int64_t seed, int64_t k) {
  check_latents(mu, logvar, at::kCPU);
  TORCH_CHECK(k >= 1, "fastvae::reparam_forward: k must be >= 1, got ", k);
  TORCH_CHECK(seed >= 0, "fastvae::reparam_forward: seed must be >= 0, got ", seed);
  auto z = at::empty({k, mu.size(0), mu.size(1)}, mu.options());
  auto kl = at::empty({mu.size(0)}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_forward_cpu", [&] {
    const ReparamForwardArgs<scalar_t> args{mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                            kl.data_ptr<scalar_t>(), mu.size(0), mu.size(1), k, static_cast<uint64_t>(seed)};
    FASTVAE_CPU_RUN(reparam_forward, args);
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparam_backward(const at::Tensor& grad_z, const std::optional<at::Tensor>& grad_kl,
                                                    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& z) {
  check_latents(mu, logvar, at::kCPU);
  const at::Tensor gk = check_reparam_backward(grad_z, grad_kl, mu, z);
  auto grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(logvar);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_backward_cpu", [&] {
    const ReparamBackwardArgs<scalar_t> args{grad_z.data_ptr<scalar_t>(), gk.defined() ? gk.data_ptr<scalar_t>() : nullptr,
                                             mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                             grad_mu.data_ptr<scalar_t>(), grad_logvar.data_ptr<scalar_t>(),
                                             mu.size(0), mu.size(1), z.size(0)};
    FASTVAE_CPU_RUN(reparam_backward, args);
  });
  return {grad_mu, grad_logvar};
}

}  // namespace fastvae::cpu
#endif
